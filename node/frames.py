"""Length-prefixed frames over one byte stream: the sync protocol's framing.

:class:`FrameStream` wraps a libp2p stream (as :meth:`crdtbook.node.p2p.Network.open_stream` and
stream handlers hand it out) or anything with the same four methods (:class:`RawStream`), so it
can be driven in process over in-memory streams. A frame is an unsigned varint length, then that
many bytes; a reader names the largest frame it accepts, and a longer one is refused from its
length prefix, before its body is read. Every read and write is bounded by a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from .p2p_errors import FrameError, FrameTooLarge, P2PTimeout, StreamEOF, StreamError

__all__ = ["FrameStream", "RawStream"]

logger = logging.getLogger(__name__)


class RawStream(Protocol):
    """The byte stream a :class:`FrameStream` runs on (libp2p's ``INetStream`` is one). ``read``
    raises ``EOFError`` or returns ``b""`` at the end of the stream; a half-close, when the stream
    has one, is a ``close_write`` method."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


def _encode_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class FrameStream:
    """A libp2p stream carrying unsigned-varint length-prefixed frames.

    Not safe for concurrent readers or concurrent writers (one of each is fine).  After
    a timeout or :class:`FrameError`, the stream's framing is undefined: reset it.
    """

    _READ_CHUNK = 64 * 1024
    _WRITE_BATCH = 60 * 1024

    def __init__(
        self, stream: RawStream, peer_id: str, protocol_id: str, io_timeout: float
    ) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._io_timeout = io_timeout
        self.peer_id = peer_id
        """The remote peer."""
        self.protocol_id = protocol_id
        """The negotiated protocol."""

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        """Send one frame.  Raises :class:`StreamError` or :class:`P2PTimeout`."""
        frame = _encode_uvarint(len(data)) + data
        try:
            with trio.fail_after(self._io_timeout if timeout is None else timeout):
                await self._stream.write(frame)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"write_frame to {self.peer_id} timed out") from exc
        except Exception as exc:
            raise StreamError(f"write_frame to {self.peer_id} failed: {exc!r}") from exc

    async def write_frames(self, frames: Sequence[bytes], *, timeout: float | None = None) -> None:
        """Send several frames with as few writes as possible (each libp2p write is
        a Yamux frame + a Noise message, about 0.2 ms: batch when sending many)."""
        batch = bytearray()
        try:
            with trio.fail_after(self._io_timeout if timeout is None else timeout):
                for data in frames:
                    batch += _encode_uvarint(len(data))
                    batch += data
                    if len(batch) >= self._WRITE_BATCH:
                        await self._stream.write(bytes(batch))
                        batch.clear()
                if batch:
                    await self._stream.write(bytes(batch))
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"write_frames to {self.peer_id} timed out") from exc
        except Exception as exc:
            raise StreamError(f"write_frames to {self.peer_id} failed: {exc!r}") from exc

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        """Receive one frame of at most ``max_size`` bytes.

        Raises :class:`StreamEOF` on a clean end of stream, :class:`FrameTooLarge`,
        :class:`FrameError`, :class:`StreamError` or :class:`P2PTimeout`.
        """
        try:
            with trio.fail_after(self._io_timeout if timeout is None else timeout):
                return await self._read_frame(max_size)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"read_frame from {self.peer_id} timed out") from exc

    async def _read_frame(self, max_size: int) -> bytes:
        while True:
            header = self._parse_header(max_size)
            if header is not None:
                hdr_len, length = header
                total = hdr_len + length
                while len(self._buf) < total:
                    if not await self._fill(total - len(self._buf)):
                        raise FrameError(f"stream from {self.peer_id} ended inside a frame")
                frame = bytes(self._buf[hdr_len:total])
                del self._buf[:total]
                return frame
            if not await self._fill(self._READ_CHUNK):
                if self._buf:
                    raise FrameError(f"stream from {self.peer_id} ended inside a frame")
                raise StreamEOF(f"stream from {self.peer_id} closed")

    def _parse_header(self, max_size: int) -> tuple[int, int] | None:
        value = 0
        for i, byte in enumerate(self._buf[:10]):
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value > max_size:
                    raise FrameTooLarge(
                        f"frame of {value} bytes from {self.peer_id} exceeds {max_size}"
                    )
                return i + 1, value
        if len(self._buf) >= 10:
            raise FrameError(f"bad frame length prefix from {self.peer_id}")
        return None

    async def _fill(self, want: int) -> bool:
        """Read more bytes into the buffer; False on end of stream."""
        try:
            chunk = await self._stream.read(max(want, self._READ_CHUNK))
        except EOFError:  # libp2p's StreamEOF subclasses EOFError
            return False
        except Exception as exc:
            raise StreamError(f"read from {self.peer_id} failed: {exc!r}") from exc
        if not chunk:
            return False
        self._buf += chunk
        return True

    async def close_write(self) -> None:
        """Half-close: tell the peer we will send nothing more (its next
        :meth:`read_frame` raises :class:`StreamEOF`); we can still read."""
        # NetStream has close_write (a Yamux FIN); the INetStream interface does not.
        close_write: Callable[[], Awaitable[None]] = getattr(
            self._stream, "close_write", self._stream.close
        )
        try:
            with trio.fail_after(self._io_timeout):
                await close_write()
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"close_write to {self.peer_id} timed out") from exc
        except Exception as exc:
            raise StreamError(f"close_write to {self.peer_id} failed: {exc!r}") from exc

    async def close(self) -> None:
        """Close the stream (never raises)."""
        try:
            with trio.move_on_after(self._io_timeout):
                await self._stream.close()
        except Exception:
            logger.debug("stream close failed", exc_info=True)

    async def reset(self) -> None:
        """Abort the stream (never raises)."""
        try:
            with trio.move_on_after(self._io_timeout):
                await self._stream.reset()
        except Exception:
            logger.debug("stream reset failed", exc_info=True)

    async def __aenter__(self) -> FrameStream:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()
