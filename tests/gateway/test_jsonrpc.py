"""JSON-RPC parsing (bastion/gateway/jsonrpc.py): the one-call fast path agrees with the general one."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from bastion.gateway import jsonrpc

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_MEMBERS = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2.0, None]),
        "method": st.one_of(st.text(max_size=10), st.integers(), st.none()),
        "params": _VALUES,
        "id": _VALUES,
        "extra": _VALUES,
    },
)


@given(_MEMBERS)
def test_a_single_call_is_parsed_as_the_general_path_parses_it(call: dict[str, Any]) -> None:
    body = msgspec.json.encode(call)
    one = jsonrpc.single_call(body)
    batch, entries = jsonrpc.parse_any(body, max_batch=100)
    assert not batch
    if one is not None:  # the fast path may decline (the general one answers); what it accepts, it reads alike
        assert entries == [one]


def test_the_usual_call_takes_the_fast_path() -> None:
    body = b'{"jsonrpc":"2.0","method":"kv.get","params":{"key":"k"},"id":7}'
    assert jsonrpc.single_call(body) == jsonrpc.Request("kv.get", {"key": "k"}, 7)
    assert jsonrpc.single_call(b'{"jsonrpc":"2.0","method":"x.y"}') == jsonrpc.Request("x.y", None, None, True)
    assert jsonrpc.single_call(b'{"jsonrpc":"2.0","method":"x.y","id":true}') is None  # the general path answers it
