"""``bastion methods`` writes each method's signature from the JSON Schemas ``admin.methods`` answers."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import bastion.testing
from bastion import Service
from bastion.cli.app import _signature
from bastion.services.admin import create_service as create_admin

service = Service("shapes")


@service.method
async def untyped(data: Any = None, choice: Literal["a", "b"] = "a", anything: Any = 1) -> Any:
    return data


def test_an_any_argument_with_a_default_is_shown_as_any_not_none() -> None:
    """``data: Any = None`` has the schema ``{"default": null}``: no type, so any value; it was shown as
    ``data: None = null`` (messages.send's data among them), as if only null were allowed."""

    async def main() -> dict[str, Any]:
        async with bastion.testing.connect([create_admin(), service]) as client:
            listing = await client.call("admin.methods")
        return next(m for s in listing for m in s["methods"] if m["name"] == "shapes.untyped")

    line = _signature(asyncio.run(main()))
    assert line == 'shapes.untyped(data: any = null, choice: "a" | "b" = "a", anything: any = 1) -> any'
