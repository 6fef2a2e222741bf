"""The built-in ``messages`` service: messages between clients, through the server.

Two patterns on the same storage, security and limits, so nobody needs a
separate broker for ordinary messaging:

* mailboxes (bastion/services/mail.py): store-and-forward, as email does --
  ``send`` puts a message in each recipient's mailbox, where it waits until
  fetched (``inbox``, ``read``, ``mark``, ``delete``, ``unread``, ``watch``);
* topics (bastion/services/topics.py): publish/subscribe -- ``publish``
  reaches the current subscribers of a topic, and durable topics keep a log
  a subscriber resumes from by offset.

``Messages`` is the hosted component ``bastion serve`` runs: one service
whose methods both halves declare, started mailboxes first and closed in
the reverse order.
"""

from __future__ import annotations

from collections.abc import Callable

from bastion.config import MessagesConfig
from bastion.security.ratelimit_shared import Holds
from bastion.service import Service
from bastion.services.mail import Mailboxes
from bastion.services.topics import Topics
from bastion.store.base import Store

__all__ = ["Messages"]


class Messages:
    """The ``messages`` service over ``store``: mailboxes and topics (a ``HostedComponent``)."""

    def __init__(
        self,
        store: Store,
        config: MessagesConfig | None = None,
        *,
        leader: bool = True,
        relay: bool = True,
        holds: Callable[[str], Holds | None] | None = None,
    ) -> None:
        """``leader``: run the background sweeps here (with several workers, only worker 0 does).
        ``relay``: other processes share the store (see ``Topics``). ``holds``: a namespace's holds
        counted across the workers of one server, for each user's mailbox watches and subscriptions."""
        self.config = config or MessagesConfig()
        self.service = Service(
            "messages",
            doc="Messages between clients: mailboxes (store-and-forward, as email) and topics (publish/subscribe).",
            refuse_nul=True,
        )
        holds = holds or (lambda namespace: None)
        self.mail = Mailboxes(store, self.config, leader=leader, watch_holds=holds("mail-watch"))
        self.topics = Topics(
            store, self.config.topics, leader=leader, relay=relay, subscribe_holds=holds("topic-subscribe")
        )
        self.mail.declare(self.service)
        self.topics.declare(self.service)

    async def start(self) -> None:
        await self.mail.start()
        await self.topics.start()

    async def aclose(self) -> None:
        await self.topics.aclose()
        await self.mail.aclose()
