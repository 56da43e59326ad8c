"""The network layer's errors: one tree under :class:`P2PError`.

Raised by :mod:`crdtbook.node.p2p` and :mod:`crdtbook.node.frames`, re-exported by ``node.p2p``.
Everything a peer or the network can cause is one of these; anything else raised through the
network's interface is a bug.
"""

from __future__ import annotations

__all__ = [
    "DialError",
    "FrameError",
    "FrameTooLarge",
    "ListenError",
    "P2PError",
    "P2PTimeout",
    "PeerBanned",
    "StreamEOF",
    "StreamError",
]


class P2PError(Exception):
    """Base class of every error the network layer (``node.p2p``, ``node.frames``) raises."""


class P2PTimeout(P2PError, TimeoutError):
    """A network call did not finish within its bound."""


class DialError(P2PError):
    """Could not connect to a peer (bad address, refused, handshake failed)."""


class PeerBanned(P2PError):
    """The operation targets a peer that is currently banned."""


class StreamError(P2PError):
    """A stream failed: reset by the peer, closed, or protocol negotiation failed."""


class StreamEOF(StreamError):
    """The peer closed the stream cleanly at a frame boundary."""


class FrameError(StreamError):
    """A malformed frame: bad length prefix or the stream ended inside a frame."""


class FrameTooLarge(FrameError):
    """A frame's announced length exceeds the reader's ``max_size``."""


class ListenError(P2PError, OSError):
    """A listen address could not be opened (in use, not an address of this machine, ...)."""
