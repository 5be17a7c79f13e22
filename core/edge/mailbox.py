"""Mailbox loop selector: ``MailboxState``, ``plan_copies``, ``write_copies``, ``delete_items`` and
``forget_item`` from the compiled module ``interlink.ext._mailbox`` when available, else from the
pure twin ``interlink.core.edge._mailbox_pure``."""

from interlink.core._select import select

_impl = select("_mailbox")

MailboxState = _impl.MailboxState
plan_copies = _impl.plan_copies
write_copies = _impl.write_copies
delete_items = _impl.delete_items
forget_item = _impl.forget_item
SHARED_MARK = _impl.SHARED_MARK

__all__ = ["SHARED_MARK", "MailboxState", "delete_items", "forget_item", "plan_copies", "write_copies"]
