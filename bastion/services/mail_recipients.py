"""Who a mailbox send reaches, and what its sender may be told about them.

Theory of operation
-------------------

``to`` names users and ``role:NAME`` groups. A role is expanded to the users
holding it when the message is sent, which makes a role send a way to learn
who holds it -- something only admins may do otherwise (``auth.list_users``).
So:

* an admin may send to every role, and is told everything, as before;
* anyone else may send only to the roles in ``messages.open_roles``; any
  other role is PERMISSION_DENIED, decided before the role is looked up,
  with the same words whether it has members, none, or holds the sender;
* a send to an open role by someone who is not an admin is *limited*: its
  answer names only the users the sender named, an error about a member's
  mailbox says "a member of role:NAME" instead of the name, and it may carry
  no attachments (each recipient would get a share of the file, and its
  owner may list the shares). None of these depends on who the members are,
  so the answers tell nothing about membership -- only, through the rate
  limit's cost, how many users a send reached.

The store finds a role's members by index (``users_with_role``), reading
at most ``max_recipients + 1`` of them: a send costs what it delivers, not
what the user table holds, and a role too large for one send is refused
without reading it all.
"""

from __future__ import annotations

import re

import msgspec

from bastion.config import MessagesConfig
from bastion.exceptions import CallError, InvalidArgument, NotFound, PermissionDenied
from bastion.security.principal import ADMIN_ROLE, USER_NAME, Principal
from bastion.store.base import Store

__all__ = ["Recipients", "resolve"]

# Used with fullmatch: "$" would also match before a final newline ("bob\n").
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ADMIN = frozenset({ADMIN_ROLE})


class Recipients(msgspec.Struct, frozen=True):
    """The users a send reaches (``users``, sorted); ``named``: those ``to`` names itself; ``roles``: the
    roles it names; ``limited``: the sender may not be told who holds them (see the module docstring)."""

    users: list[str]
    named: frozenset[str]
    roles: list[str]
    limited: bool

    def shown(self, users: list[str]) -> list[str]:
        """``users`` as the sender may see them: without the members of a role, when limited."""
        return [u for u in users if u in self.named] if self.limited else users

    def hidden(self, user: object) -> bool:
        """Whether ``user`` is a member the sender may not be told of."""
        return self.limited and user not in self.named

    def conceal(self, exc: CallError) -> CallError:
        """``exc`` without the name of a mailbox the sender may not be told of."""
        mailbox = exc.details.get("mailbox")
        if not self.hidden(mailbox):
            return exc
        who = "a member of " + " or ".join(f"role:{role}" for role in self.roles)
        details = {k: v for k, v in exc.details.items() if k != "mailbox"}
        message = exc.message.replace(f"the mailbox of {mailbox!r}", f"the mailbox of {who}", 1)
        return type(exc)(message, details=details, retry_after=exc.retry_after)


async def resolve(store: Store, config: MessagesConfig, principal: Principal, to: list[str]) -> Recipients:
    """The users ``to`` names, each once, with every ``role:NAME`` expanded to that role's users now."""
    if not to:
        raise InvalidArgument("to: name at least one recipient (a user, or role:NAME)")
    users: set[str] = set()
    roles: set[str] = set()
    for entry in to:
        if entry.startswith("role:"):
            if not _ROLE.fullmatch(entry[5:]):
                raise InvalidArgument(f"to: {entry!r} is not a valid role:NAME")
            roles.add(entry[5:])
        elif USER_NAME.fullmatch(entry):
            users.add(entry)
        else:
            raise InvalidArgument(f"to: {entry!r} is not a user name or role:NAME")
    admin = principal.has_roles(_ADMIN)
    for role in sorted(roles):
        if not admin and role not in config.open_roles:
            raise PermissionDenied(
                f"to: only admins may send to role:{role} (an admin may open a role to everyone in messages.open_roles)"
            )
    everyone = set(users)
    most = config.max_recipients
    for role in sorted(roles):
        members = await store.users_with_role(role, most + 1)
        if not members:
            raise NotFound(f"to: no user holds role {role!r}")
        if len(members) > most:
            raise InvalidArgument(f"to: role:{role} has more than {most} users, over messages.max_recipients ({most})")
        everyone.update(members)
    if len(everyone) > config.max_recipients:
        raise InvalidArgument(f"{len(everyone)} recipients, over messages.max_recipients ({config.max_recipients})")
    return Recipients(sorted(everyone), frozenset(users), sorted(roles), bool(roles) and not admin)
