"""Group fan-out selector: ``GroupDlv``, ``plan_group``, ``plan_cached``, ``splice`` and ``device_key`` from the compiled module
``interlink.ext._fanout`` when available, else from the pure twin ``interlink.core.domain._fanout_pure``."""

from interlink.core._select import select

_impl = select("_fanout")

GroupDlv = _impl.GroupDlv
plan_group = _impl.plan_group
plan_cached = _impl.plan_cached
device_key = _impl.device_key
splice = _impl.splice
DLV_HEAD = _impl.DLV_HEAD

__all__ = ["DLV_HEAD", "GroupDlv", "device_key", "plan_cached", "plan_group", "splice"]
