"""The shell's limits (node/limits.py) agree with the core's and the network layer's: what one
side builds, the other accepts (issue #13)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import crdtbook._sync as core_sync
from crdtbook import MAX_OP_BYTES, BloomFilter
from crdtbook.node import limits
from crdtbook.node.service import _batch_length
from crdtbook.node.wire import decode_batch, encode_batch

from .test_service_inprocess import V1, bare

pytestmark = pytest.mark.timeout(30)


def test_pubsub_carries_the_largest_gossip_message_the_node_builds() -> None:
    from crdtbook.node.p2p import NetworkConfig

    assert NetworkConfig().max_message_size == limits.MAX_GOSSIP_BYTES


@pytest.mark.parametrize("op_bytes", [200, 1000, MAX_OP_BYTES])
def test_a_gossip_batch_fits_a_message_whatever_its_ops_weigh(op_bytes: int) -> None:
    outbox = [os.urandom(op_bytes) for _ in range(limits.MAX_BATCH_OPS + 5)]
    count = _batch_length(outbox, limits.MAX_BATCH_OPS)
    message = encode_batch(outbox[:count])
    assert len(message) <= limits.MAX_GOSSIP_BYTES
    assert decode_batch(message) == outbox[:count]
    if count < limits.MAX_BATCH_OPS:  # cut by bytes, conservatively, yet nearly full
        assert len(message) > 0.99 * limits.MAX_GOSSIP_BYTES - op_bytes


async def test_flush_publishes_big_ops_in_messages_pubsub_accepts(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        ms.outbox = [os.urandom(MAX_OP_BYTES) for _ in range(600)]  # ~2.4 MB in all
        sent: list[bytes] = []

        async def publish(topic: str, data: bytes) -> None:
            sent.append(data)

        await n.service.flush(ms, publish)
        assert len(sent) == 3 and all(len(m) <= limits.MAX_GOSSIP_BYTES for m in sent)
        assert sum(len(decode_batch(m)) for m in sent) == 600 and not ms.outbox


def test_a_sync_frame_holds_the_largest_op_with_its_heads() -> None:
    heads = limits.MAX_IDS * (32 + 3)
    assert MAX_OP_BYTES + heads + 64 * 1024 < limits.MAX_FRAME_BYTES


@pytest.mark.parametrize("ids", [limits.BLOOM_RECENT_OPS, limits.MAX_HELD])
def test_the_node_s_own_bloom_filters_fit_the_wire(ids: int) -> None:
    bloom = BloomFilter.for_ids(os.urandom(32) for _ in range(ids))
    assert len(bloom.bits) <= limits.MAX_BLOOM_BYTES


def test_the_wire_s_bloom_bound_is_inside_the_core_s() -> None:
    assert limits.MAX_BLOOM_BYTES <= core_sync._MAX_BLOOM_BYTES


def test_a_gossip_message_over_the_pubsub_cap_is_malformed() -> None:
    from crdtbook.node.wire import WireError

    with pytest.raises(WireError, match="too large"):
        decode_batch(b"\x00" * (limits.MAX_GOSSIP_BYTES + 1))
