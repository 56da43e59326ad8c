"""ed25519 identities: the key that signs an author's ops."""

from __future__ import annotations

import os

import nacl.bindings

__all__ = ["Identity"]

SEED_BYTES = 32


class Identity:
    """An ed25519 key pair. ``public_key`` (32 bytes) is the author field of every op it signs."""

    __slots__ = ("_secret", "public_key", "seed")

    seed: bytes
    public_key: bytes
    _secret: bytes

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValueError("an identity seed is exactly 32 bytes")
        public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "_secret", secret)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Identity is immutable")

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The same 32-byte seed always gives the same key (tests, vectors, key files)."""
        return cls(seed)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key from the OS's entropy: the one place the core touches randomness, and
        never on the path of derivation."""
        return cls(os.urandom(SEED_BYTES))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached ed25519 signature of ``message``."""
        signed: bytes = nacl.bindings.crypto_sign(message, self._secret)
        return signed[:64]

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key.hex()[:16]}...)"
