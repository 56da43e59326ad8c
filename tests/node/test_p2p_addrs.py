"""Listen and bootstrap addresses: what the network refuses, and that a port is never shared.

py-libp2p 0.8.1 opens TCP listen sockets with SO_REUSEPORT, and its swarm only logs a failed
listen at DEBUG: a node started on a port another node listened on came up on it (both sockets
in LISTEN, the kernel splitting connections between them), and one on a port held without
SO_REUSEPORT came up listening on nothing. ``open_network`` listens exclusively and raises
:class:`ListenError` instead. Every socket here is on 127.0.0.1, on a port free at run time.
"""

from __future__ import annotations

import errno
import hashlib
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import libp2p.transport.tcp.tcp as libp2p_tcp
import pytest
import trio

from crdtbook.node.p2p import (
    ListenError,
    NetworkConfig,
    check_bootstrap_addr,
    check_listen_addr,
    open_network,
    peer_id_of_seed,
)

FAST = NetworkConfig(heartbeat_interval=0.2, call_timeout=5.0, dial_timeout=5.0)
PEER = peer_id_of_seed(hashlib.sha256(b"peer").digest())


def seed(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@contextmanager
def listening_socket(*, reuseport: bool) -> Iterator[int]:
    """A socket listening on a free loopback port (as a stock libp2p node's, with
    SO_REUSEPORT, or a plain one); yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])
        # The owner still has its port and still accepts.
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5) as c:
            conn, _ = sock.accept()
            conn.close()
            assert c.fileno() >= 0
    finally:
        sock.close()


def _bind_listen(port: int, set_flags: object) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert callable(set_flags)
        set_flags(sock)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def test_stock_listen_flags_share_a_port_ours_do_not() -> None:
    """Control: with libp2p's own flags (SO_REUSEPORT) a second listener on a busy port is
    accepted; with ours the kernel refuses it."""
    from crdtbook.node import p2p_install

    p2p_install.install()  # as opening a network does (alone, this test ran before any did)
    stock = libp2p_tcp._set_reuse_flags._crdtbook_original  # type: ignore[attr-defined]
    ours = libp2p_tcp._set_reuse_flags
    assert ours is not stock
    with listening_socket(reuseport=True) as port:
        second = _bind_listen(port, stock)
        second.close()
        with pytest.raises(OSError) as refused:
            _bind_listen(port, ours)
        assert refused.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize("reuseport", [True, False], ids=["owner-reuseport", "owner-plain"])
async def test_open_network_refuses_a_port_in_use(reuseport: bool) -> None:
    with trio.fail_after(15), listening_socket(reuseport=reuseport) as port:
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        with pytest.raises(ListenError) as refused:
            async with open_network(seed("second"), [addr], config=FAST):
                pytest.fail("the network started on a port in use")
        assert str(refused.value) == f"cannot listen on {addr}: address already in use"
        assert isinstance(refused.value, OSError)  # the node reports it as one line
        # Nothing was left behind: the same identity starts at once on a free port.
        async with open_network(seed("second"), ["/ip4/127.0.0.1/tcp/0"], config=FAST) as net:
            assert net.addrs()


async def test_two_networks_never_share_a_port() -> None:
    with trio.fail_after(15):
        async with open_network(seed("first"), ["/ip4/127.0.0.1/tcp/0"], config=FAST) as first:
            port = first.addrs()[0].split("/")[4]
            with pytest.raises(ListenError, match="address already in use"):
                async with open_network(
                    seed("second"), [f"/ip4/127.0.0.1/tcp/{port}"], config=FAST
                ):
                    pytest.fail("two nodes listen on one port")
            # The first is untouched: a third node still reaches it.
            async with open_network(seed("third"), ["/ip4/127.0.0.1/tcp/0"], config=FAST) as n:
                assert await n.connect(first.addrs()[0]) == first.peer_id


async def test_one_busy_address_among_several_fails_the_start() -> None:
    with trio.fail_after(15), listening_socket(reuseport=False) as port:
        busy = f"/ip4/127.0.0.1/tcp/{port}"
        with pytest.raises(ListenError, match=f"{busy}: address already in use"):
            async with open_network(seed("n"), ["/ip4/127.0.0.1/tcp/0", busy], config=FAST):
                pytest.fail("started with one listen address missing")


@pytest.mark.parametrize(
    "addr", ["/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/0", "/ip6/::1/tcp/0", "/ip6/::/tcp/1"]
)
def test_listen_addresses_accepted(addr: str) -> None:
    check_listen_addr(addr)


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("/ip4/127.0.0.1/udp/4001", "TCP only"),
        ("/ip4/127.0.0.1/udp/4001/quic-v1", "TCP only"),
        ("garbage", "is not a multiaddr"),
        ("", "not a plain TCP address"),
        ("/ip4/127.0.0.1/tcp/99999", "is not a multiaddr"),
        ("/dns4/localhost/tcp/4001", "needs an IP address"),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}", "no /p2p part"),
        ("/ip4/127.0.0.1/tcp/4001/ws", "not a plain TCP address"),
    ],
)
async def test_listen_addresses_refused(addr: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as refused:
        check_listen_addr(addr)
    assert "\n" not in str(refused.value)
    with trio.fail_after(10), pytest.raises(ValueError, match=reason):
        async with open_network(seed("n"), [addr], config=FAST):
            pytest.fail("started on an address it cannot listen on")


@pytest.mark.parametrize(
    "addr",
    [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",
        f"/ip6/::1/tcp/4001/p2p/{PEER}",
        f"/dns4/node.example/tcp/4001/p2p/{PEER}",
        "/ip4/10.0.0.5/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    ],
)
def test_bootstrap_addresses_accepted(addr: str) -> None:
    assert check_bootstrap_addr(addr) == addr.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("garbage", "is not a multiaddr"),
        ("/ip4/127.0.0.1/tcp/4001", r"does not end in /p2p/<peer id>"),
        (f"/p2p/{PEER}", "is not a TCP address"),
        (f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{PEER}", "is not a TCP address"),
        (f"/ip4/127.0.0.1/tcp/0/p2p/{PEER}", "port 0"),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER[:12]}", "malformed peer id"),
    ],
)
def test_bootstrap_addresses_refused(addr: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as refused:
        check_bootstrap_addr(addr)
    assert "\n" not in str(refused.value)


def test_peer_id_without_libp2p_is_libp2ps() -> None:
    """`crdtbook id` with no node running computes the peer id itself (the CLI never imports
    libp2p): it must be the id the node announces."""
    from crdtbook import Identity
    from crdtbook.node.home import peer_id_of_public_key
    from crdtbook.node.p2p import peer_id_of_seed

    for n in range(64):
        seed = bytes([n]) * 32
        assert peer_id_of_public_key(Identity.from_seed(seed).public_key) == peer_id_of_seed(seed)
    with pytest.raises(ValueError):
        peer_id_of_public_key(b"\x01" * 31)


async def test_a_restarted_peer_is_dialled_at_once_not_a_minute_later() -> None:
    """libp2p refuses for 60 s to dial a peer all of whose addresses failed once (its negative
    cache); a node cut off from a restarted peer stayed so for 40-60 s. Network.connect evicts
    the peer first: our callers pace their own dials."""
    from libp2p.network.exceptions import SwarmException
    from libp2p.peer.id import ID

    from crdtbook.node.p2p import DialError

    with trio.fail_after(30):
        async with open_network(seed("a"), ["/ip4/127.0.0.1/tcp/0"], config=FAST) as a:
            async with open_network(seed("b"), ["/ip4/127.0.0.1/tcp/0"], config=FAST) as b:
                addr = b.addrs()[0]
                peer = b.peer_id
            with pytest.raises(DialError):  # b is gone
                await a.connect(addr)
            swarm = a._host.get_network()
            listen = addr.split("/p2p/")[0]
            async with open_network(seed("b"), [listen], config=FAST):  # b again, same port
                # Stock: the dial is refused without an attempt, for a minute.
                with pytest.raises(SwarmException, match="negative cache"):
                    await swarm.dial_peer(ID.from_base58(peer))
                assert await a.connect(addr) == peer  # ours: dialled, and it answers
                assert peer in a.connected_peers()
