"""The one-node end-to-end group tests, run again against a cluster of three nodes (issue 18):
``alice@alpha``, ``bob@beta`` and ``gus@gamma`` live on three different nodes, every device
connects through a node that is not its home, and each group lives on the node its id hashes to
— so requests, messages and membership events cross nodes: to the group's home, and from there
to every member's home, which stores its members' copies."""

from __future__ import annotations

from e2e.test_cluster import nats_server  # noqa: F401 (a fixture)
from e2e.test_cluster_messaging import people  # noqa: F401 (the cluster's fixture)
from e2e.test_groups import (  # noqa: F401
    test_adding_needs_the_members_consent_and_a_known_user,
    test_adding_present_or_removing_absent_members_changes_nothing,
    test_duplicates_blocks_and_typing,
    test_malformed_group_messages_get_bad_stanza,
    test_malformed_group_operations_get_bad_stanza,
    test_membership_events_are_ordered_by_ver_and_removed_or_left_members_get_nothing_after,
    test_refusal_codes_and_the_session_continues,
    test_three_provider_group_every_device_gets_every_message_once_in_ack_order,
)
