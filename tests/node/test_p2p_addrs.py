"""Listen addresses: a port is never shared, and one that cannot be opened fails the start.

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

from crdtbook.node.p2p import ListenError, NetworkConfig, open_network

FAST = NetworkConfig(heartbeat_interval=0.2, call_timeout=5.0, dial_timeout=5.0)


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
