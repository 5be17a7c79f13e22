"""The one-node end-to-end tests of 1:1 messaging, receipts, typing state, keys, devices, consent,
blocks, reports and blobs, run again against a cluster of three nodes (issue 18): the node ids are
chosen so that ``alice@alpha``, ``bob@beta`` and ``gus@gamma`` live on three different nodes, and
every device connects through a node that is not its home (so every session was redirected)."""

from __future__ import annotations

import os

import pytest

from interlink.client import Client
from interlink.core.errors import ServerError
from e2e.test_cluster import Cluster, nats_server  # noqa: F401 (a fixture)

from e2e.test_blobs import (  # noqa: F401
    test_a_file_of_several_megabytes_goes_across_providers_and_devices,
    test_a_wrong_hash_is_bad_hash_and_a_second_try_succeeds,
    test_an_upload_resumes_after_the_connection_drops,
    test_bad_input_gets_its_code_and_the_session_goes_on,
    test_blob_figures_reach_the_operator,
    test_chunks_out_of_order_and_twice_over_tcp,
)
from e2e.test_keys import (  # noqa: F401
    test_bundles_of_several_devices_and_devices_without_keys,
    test_consent_is_checked_before_existence,
    test_fifty_clients_fetching_at_once_never_get_the_same_one_time_prekey,
    test_keys_get_is_rate_limited_per_user,
    test_malformed_key_operations_get_bad_stanza_with_the_id_and_the_session_continues,
    test_put_get_count_round_trip,
    test_signed_prekey_replacement_and_device_reset,
    test_the_one_time_prekey_stock_is_capped,
)
from e2e.test_messaging import (  # noqa: F401
    test_a_malformed_recipient_is_quoted_back_as_a_short_excerpt,
    test_consent_defaults_refuse_other_providers,
    test_device_mismatch_lists_missing_and_extra,
    test_malformed_messaging_stanzas_get_bad_stanza_and_the_session_continues,
    test_malformed_receipts_and_states_get_bad_stanza,
    test_message_reaches_every_device_and_own_copies,
    test_outbox_resends_unacked_messages_after_a_lost_connection,
    test_oversize_ciphertext_is_too_large,
    test_receipts_reach_the_sender_and_your_other_devices,
    test_retransmission_is_stored_once_and_acked_dup,
    test_seen_drops_redeliveries_across_sessions,
    test_typing_state_is_pushed_to_online_devices_only,
    test_typing_state_to_an_unregistered_provider_is_not_opted_in,
    test_unknown_recipients,
    test_unreceived_items_come_again_after_reconnect,
)
from e2e.test_operations import (  # noqa: F401
    test_block_add_refusals_and_the_block_limit,
    test_blocked_sender_gets_a_plain_ack_and_nothing_is_delivered,
    test_consent_get_defaults_and_set_round_trip,
    test_consent_set_decides_who_may_message_and_list_devices,
    test_devices_get_lists_devices_and_obeys_consent,
    test_dir_lookup_finds_only_discoverable_users_who_accept_the_asker,
    test_dir_lookup_is_rate_limited_per_user,
    test_malformed_operations_get_bad_stanza_with_the_id_and_the_session_continues,
    test_reports_are_rate_limited_per_user,
)

# With these ids the three main test users live on three different nodes.
NODES = ("node-a", "node-d", "node-g")
HOMES = {"alice@alpha": "node-a", "bob@beta": "node-d", "gus@gamma": "node-g"}


class ClusterPeople:
    """``three_providers.People`` for a cluster: connects through a node that is not the user's home."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @property
    def gateway(self):
        """alice@alpha's node: the one-node blob tests read the uploader's gateway (its blob files,
        its figures), and alice uploads in all of them."""
        return self.cluster.gateways[HOMES["alice@alpha"]]

    async def connect(self, address: str, device: int = 1, *, phone: str | None = None, verified: bool = True,
                      **options) -> Client:
        localpart, provider = address.split("@")
        extra = {"phone_number": phone, "phone_number_verified": verified} if phone is not None else None
        token = self.cluster.issuers[provider].issue(localpart, audience="interlink-test", extra_claims=extra)
        home = self.cluster.home(address)
        via = next(node for node in self.cluster.nodes if node != home)
        client = await Client.connect("127.0.0.1", self.cluster.ports[via], token=token, device=device,
                                      root_public=self.cluster.gateways[via].root_public, **options)
        assert client._conn.certificate.node == home  # redirected home
        return client


@pytest.fixture
async def people(issuers, tmp_path, nats_server):
    cluster = Cluster(issuers, tmp_path, nats_server.url, nodes=NODES)
    assert {user: cluster.home(user) for user in HOMES} == HOMES
    for node in NODES:
        await cluster.start(node)
    yield ClusterPeople(cluster)
    await cluster.stop_all()


async def test_a_blob_lives_on_its_uploaders_node_and_is_read_from_any_other(people, tmp_path):
    """Its id hashes to the uploader's node, so a reader's node knows where to ask: bob's node
    relays each blob.read there; nothing of the blob is stored on bob's node."""
    cluster = people.cluster
    alice, bob = await people.connect("alice@alpha"), await people.connect("bob@beta")
    data = os.urandom(200_000)
    blobs = [await alice.upload_blob(data) for _ in range(4)]
    assert {cluster.home(blob) for blob in blobs} == {HOMES["alice@alpha"]}
    relay = cluster.gateways[HOMES["bob@beta"]]._server.domain.relay
    before = relay.counters["relayed"]
    assert await bob.download_blob(blobs[0]) == data
    assert relay.counters["relayed"] - before >= 4  # one per chunk
    assert not (cluster.gateways[HOMES["bob@beta"]].config.data_dir / "blobs" / blobs[0][:1].hex()).exists()
    with pytest.raises(ServerError) as caught:  # an id homed on gus's node that nobody uploaded
        await bob.iq("blob.read", blob=next(b for b in (os.urandom(16) for _ in range(1000))
                                            if cluster.home(b) == HOMES["gus@gamma"]), off=0, len=10)
    assert caught.value.code == "not_found"
    await alice.close()
    await bob.close()
