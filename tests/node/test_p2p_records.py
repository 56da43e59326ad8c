"""The signed-peer-record cache keeps the library's verdicts: only repeats are skipped."""

from __future__ import annotations

from collections.abc import Iterator

import libp2p.pubsub.gossipsub
import libp2p.pubsub.pubsub
import multiaddr
import pytest
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.envelope import seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.pubsub.pb.rpc_pb2 import RPC

from crdtbook.node import p2p_records


def _rpc_with_record(addr: str = "/ip4/127.0.0.1/tcp/4001") -> tuple[RPC, ID]:
    keys = create_new_key_pair()
    peer = ID.from_pubkey(keys.public_key)
    envelope = seal_record(PeerRecord(peer, [multiaddr.Multiaddr(addr)]), keys.private_key)
    rpc = RPC()
    rpc.senderRecord = envelope.marshal_envelope()
    return rpc, peer


@pytest.fixture
def host() -> IHost:
    return new_host(key_pair=create_new_key_pair())


@pytest.fixture
def library_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ID]]:
    calls: list[ID] = []
    library = p2p_records._library_consume

    def counting(msg: RPC, host: IHost, peer_id: ID) -> bool:
        calls.append(peer_id)
        return library(msg, host, peer_id)

    monkeypatch.setattr(p2p_records, "_library_consume", counting)
    yield calls


def test_installed_where_pubsub_looks_them_up() -> None:
    from crdtbook.node import p2p_install

    p2p_install.install()  # what open_network does first

    for module in (libp2p.pubsub.pubsub, libp2p.pubsub.gossipsub):
        assert module.maybe_consume_signed_record is p2p_records.cached_consume_signed_record
        assert module.env_to_send_in_RPC is p2p_records.cached_env_to_send_in_rpc


def test_a_good_record_is_checked_once_then_remembered(
    host: IHost, library_calls: list[ID]
) -> None:
    rpc, peer = _rpc_with_record()
    assert p2p_records.cached_consume_signed_record(rpc, host, peer)
    assert p2p_records.cached_consume_signed_record(rpc, host, peer)
    assert library_calls == [peer]
    assert host.get_peerstore().get_peer_record(peer) is not None


def test_the_same_record_from_another_peer_is_checked_and_refused(
    host: IHost, library_calls: list[ID]
) -> None:
    rpc, peer = _rpc_with_record()
    assert p2p_records.cached_consume_signed_record(rpc, host, peer)
    impostor = ID.from_pubkey(create_new_key_pair().public_key)
    assert not p2p_records.cached_consume_signed_record(rpc, host, impostor)
    assert not p2p_records.cached_consume_signed_record(rpc, host, impostor)
    assert library_calls == [peer, impostor, impostor]  # a refusal is never remembered


def test_a_forged_record_is_refused_every_time(host: IHost, library_calls: list[ID]) -> None:
    rpc, peer = _rpc_with_record()
    forged = bytearray(rpc.senderRecord)
    forged[-1] ^= 1  # inside the signature
    rpc.senderRecord = bytes(forged)
    for _ in range(3):
        assert not p2p_records.cached_consume_signed_record(rpc, host, peer)
    assert len(library_calls) == 3


def test_no_record_is_fine_and_costs_nothing(host: IHost, library_calls: list[ID]) -> None:
    peer = ID.from_pubkey(create_new_key_pair().public_key)
    assert p2p_records.cached_consume_signed_record(RPC(), host, peer)
    assert library_calls == []


def test_the_host_record_to_send_is_reused(host: IHost, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[IHost] = []
    library = p2p_records._library_env_to_send

    def counting(h: IHost) -> tuple[bytes, bool]:
        calls.append(h)
        return library(h)

    monkeypatch.setattr(p2p_records, "_library_env_to_send", counting)
    first = p2p_records.cached_env_to_send_in_rpc(host)
    assert p2p_records.cached_env_to_send_in_rpc(host) == first
    assert calls == [host]
