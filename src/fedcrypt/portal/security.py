"""Passwords (argon2), bearer secrets, CSRF tokens and the sign-in rate limiter."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
# Verified against when the e-mail is unknown, so both paths take the same time.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

TOKEN_PREFIX = "fcp"  # noqa: S105 (a prefix, not a secret)


def hash_password(password: str) -> str:
    """Hash ``password`` with argon2id (a fresh salt every time)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check ``password`` against an argon2 hash; ``None`` still spends the same time."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than the current ones."""
    return _hasher.check_needs_rehash(password_hash)


def sha256_hex(data: str) -> str:
    """Hex SHA-256 of a UTF-8 string."""
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(frozen=True)
class BearerSecret:
    """A freshly issued credential ``<prefix>_<key_id>.<secret>``, shown once.

    Only ``key_id`` (for lookup) and ``sha256(secret)`` are stored; the lookup is by
    ``key_id`` and the secret is then compared in constant time.
    """

    key_id: str
    secret: str
    prefix: str = TOKEN_PREFIX

    @property
    def value(self) -> str:
        """The full credential as handed to the user."""
        return f"{self.prefix}_{self.key_id}.{self.secret}"

    @property
    def secret_hash(self) -> str:
        """What the database stores."""
        return sha256_hex(self.secret)


def new_bearer_secret(prefix: str = TOKEN_PREFIX) -> BearerSecret:
    """Issue a credential with a 32-byte random secret from :mod:`secrets`."""
    return BearerSecret(
        key_id=secrets.token_hex(8), secret=secrets.token_urlsafe(32), prefix=prefix
    )


def split_bearer(value: str, prefix: str = TOKEN_PREFIX) -> tuple[str, str] | None:
    """Split ``<prefix>_<key_id>.<secret>`` into ``(key_id, secret)``; ``None`` if malformed."""
    head, sep, secret = value.partition(".")
    if not sep or not head.startswith(prefix + "_") or not secret or len(value) > 200:
        return None
    key_id = head[len(prefix) + 1 :]
    if not key_id or not key_id.isalnum():
        return None
    return key_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of ``sha256(secret)`` with a stored hash."""
    return hmac.compare_digest(sha256_hex(secret), stored_hash)


CSRF_CONTEXT = b"fedcrypt/portal/csrf/v2|"


def csrf_token(secret_key: str, binding: str) -> str:
    """The form token bound to ``binding``: HMAC-SHA256 under the server secret.

    ``binding`` is the signed-in browser session (``"session:<key id>"``), or for the
    sign-in and registration forms an HttpOnly nonce cookie (``"nonce:<value>"``)
    (OWASP CSRF Prevention Cheat Sheet, signed double-submit cookie bound to the
    session). A forged form from another site knows neither, and a token taken from one
    session is worthless in another.
    """
    return hmac.new(
        secret_key.encode(), CSRF_CONTEXT + binding.encode(), hashlib.sha256
    ).hexdigest()


def csrf_valid(secret_key: str, binding: str | None, token: str | None) -> bool:
    """Check a submitted form token against its binding in constant time."""
    if not binding or not token:
        return False
    return hmac.compare_digest(csrf_token(secret_key, binding), token)


class LoginRateLimiter:
    """Count failed sign-ins per key (e.g. account and client address) in a sliding window.

    Parameters
    ----------
    max_failures : int
        Failures allowed per key within ``window_s``.
    window_s : float
        Window length in seconds.
    clock : callable, optional
        Returns the current time in seconds (default: :func:`time.monotonic`).
    """

    def __init__(
        self, max_failures: int, window_s: float, clock: Callable[[], float] | None = None
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock or time.monotonic
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until any of ``keys`` may try again; 0 if none is blocked."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                q = self._prune(key, now)
                if len(q) >= self.max_failures:
                    wait = max(wait, self.window_s - (now - q[0]))
        return wait

    #: Keys kept before expired ones are swept (bounds memory under many addresses).
    SWEEP_ABOVE = 100_000

    def failure(self, *keys: str) -> None:
        """Record a failed attempt against every key."""
        now = self._clock()
        with self._lock:
            if len(self._failures) > self.SWEEP_ABOVE:
                for stale in [
                    k for k, q in self._failures.items() if not q or now - q[-1] >= self.window_s
                ]:
                    del self._failures[stale]
            for key in keys:
                self._prune(key, now).append(now)

    def reset(self, key: str) -> None:
        """Forget the failures of ``key`` (after a successful sign-in)."""
        with self._lock:
            self._failures.pop(key, None)
