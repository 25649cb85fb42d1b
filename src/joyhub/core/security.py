"""Security primitives in one module: password hashing, JWTs, opaque tokens, key hashing.

- Passwords: bcrypt over a SHA-256 pre-hash (base64, 44 bytes), so the whole password counts
  and bcrypt's 72-byte limit never truncates silently. bcrypt runs on its own small thread pool.
- Access tokens: PyJWT, HS256 pinned, required claims, `type: "access"`.
- Refresh/reset tokens and API keys: random, shown once, stored only as SHA-256 digests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar

import bcrypt
import jwt

from joyhub.core.clock import utcnow
from joyhub.core.errors import ServiceUnavailable

JWT_ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["sub", "sid", "jti", "iat", "exp", "type", "role"]
API_KEY_PREFIX = "jfui_"
_IAT_LEEWAY_SECONDS = 60
_T = TypeVar("_T")


def _prehash(password: str) -> bytes:
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def hash_password_sync(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password_sync(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(_prehash(password), password_hash.encode("ascii"))
    except ValueError:
        return False


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# bcrypt releases the GIL but burns a whole core per hash. Running it on a small pool of its own
# (one thread fewer than the CPUs this process may use, at least one) leaves a core to the event
# loop, so a burst of logins queues up behind itself instead of stalling every other request.
BCRYPT_THREADS = max(1, _cpu_count() - 1)
_bcrypt_pool = ThreadPoolExecutor(max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt")

# The queue in front of that pool is bounded: with more than this many hashes waiting or running
# in this process, a new one is refused at once with 503 and a Retry-After, rather than queued
# behind minutes of work its client will have given up on long before (64 hashes at ~0.25 s on
# one thread is already ~16 s of waiting). BCRYPT_MAX_PENDING (settings) sets it at start-up.
BCRYPT_MAX_PENDING = 64


def set_bcrypt_max_pending(limit: int) -> None:
    """The process's bound on queued hashes (`Settings.bcrypt_max_pending`, set by `create_app`)."""
    global BCRYPT_MAX_PENDING
    BCRYPT_MAX_PENDING = limit


_INITIAL_SECONDS_PER_HASH = 0.25  # the estimate until real hashes have been timed
_pending_lock = threading.Lock()
_pending = 0
_seconds_per_hash = _INITIAL_SECONDS_PER_HASH  # moving average of the recent hashes


class BcryptBusy(ServiceUnavailable):
    """Too many password hashes are already waiting in this process (503 with Retry-After)."""

    message = "The server is busy checking passwords; try again later"


def bcrypt_pending() -> int:
    """Hashes waiting for or running on the bcrypt pool right now (this process)."""
    return _pending


def _retry_after(pending: int) -> str:
    """Seconds until the current queue has drained, by the recent time per hash."""
    return str(max(1, math.ceil(pending * _seconds_per_hash / BCRYPT_THREADS)))


def ensure_bcrypt_capacity() -> None:
    """Raise BcryptBusy when the queue is full.

    Called before the work a refused attempt must not leave behind (a login reserves a throttle
    slot before bcrypt); `_off_loop` enforces the same bound on every hash anyway.
    """
    _refuse_if_full(_pending)


def _refuse_if_full(pending: int) -> None:
    if pending >= BCRYPT_MAX_PENDING:
        raise BcryptBusy(headers={"Retry-After": _retry_after(pending)})


def _timed(fn: Callable[..., _T], *args: Any) -> _T:
    """Run one hash on a pool thread and fold its duration into the average."""
    global _seconds_per_hash
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        elapsed = time.perf_counter() - started
        with _pending_lock:
            _seconds_per_hash = 0.8 * _seconds_per_hash + 0.2 * elapsed


def _release(_: Future[Any] | None = None) -> None:
    """A hash finished, failed or was cancelled before it started: its place is free."""
    global _pending
    with _pending_lock:
        _pending -= 1


async def _off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn` on the bcrypt pool, or raise BcryptBusy when its queue is full.

    The place is given back when the pool is done with the job (not when the caller stops
    waiting), so a cancelled request whose hash is already running still counts until it ends.
    """
    global _pending
    with _pending_lock:
        _refuse_if_full(_pending)
        _pending += 1
    try:
        job = _bcrypt_pool.submit(_timed, fn, *args)
    except BaseException:
        _release()
        raise
    job.add_done_callback(_release)
    # cancelling the wrapper cancels the job if it has not started yet (as run_in_executor does)
    return await asyncio.wrap_future(job)


async def hash_password(password: str, rounds: int) -> str:
    """bcrypt off the event loop, so a login burst never stalls other requests."""
    return await _off_loop(hash_password_sync, password, rounds)


async def verify_password(password: str, password_hash: str) -> bool:
    return await _off_loop(verify_password_sync, password, password_hash)


def _verify_against_dummy(password: str, rounds: int) -> None:
    verify_password_sync(password, dummy_hash(rounds))


async def verify_dummy(password: str, rounds: int) -> None:
    """An unknown email costs what a wrong password costs (the dummy hash is made off the loop too)."""
    await _off_loop(_verify_against_dummy, password, rounds)


@lru_cache(maxsize=8)
def dummy_hash(rounds: int) -> str:
    """A hash to check against when the email is unknown, so timing reveals nothing."""
    return hash_password_sync(secrets.token_urlsafe(16), rounds)


@dataclass(frozen=True)
class AccessClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    role: str
    jti: str
    expires_at: datetime


def create_access_token(
    *, user_id: uuid.UUID, session_id: uuid.UUID, role: str, secret: str, ttl: timedelta
) -> str:
    now = utcnow()
    payload = {
        "sub": str(user_id),
        "sid": str(session_id),
        "role": role,
        "jti": uuid.uuid4().hex,
        "iat": int(now.timestamp()),
        "exp": int((now + ttl).timestamp()),
        "type": "access",
    }
    return jwt.encode(payload, secret, algorithm=JWT_ALGORITHM)


class TokenError(Exception):
    """The token is malformed, wrongly signed, expired or not an access token."""


@dataclass(frozen=True)
class _Verified:
    """What a correctly signed access token says; the time checks are made on every use."""

    claims: AccessClaims
    issued_at: int
    expires_at: int


# A verified token decodes to the same claims every time, so the verification (base64, two JSON
# documents, HMAC: ~0.2 ms) is done once per token and secret, not once per request. Only tokens
# that verify are cached (lru_cache does not cache exceptions), so forged tokens cannot fill it;
# expiry is re-checked on every use against joyhub's clock. Session revocation is not a property
# of the token: the session query of every request still decides that.
@lru_cache(maxsize=8192)
def _verify_signature(token: str, secret: str) -> _Verified:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            # exp and iat are checked by the caller against joyhub's clock (which tests move)
            options={"require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False},
        )
        if claims.get("type") != "access":
            raise TokenError("not an access token")
        exp = int(claims["exp"])
        return _Verified(
            AccessClaims(
                user_id=uuid.UUID(str(claims["sub"])),
                session_id=uuid.UUID(str(claims["sid"])),
                role=str(claims["role"]),
                jti=str(claims["jti"]),
                expires_at=datetime.fromtimestamp(exp).astimezone(),
            ),
            issued_at=int(claims["iat"]),
            expires_at=exp,
        )
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError, OSError) as exc:
        raise TokenError(str(exc)) from None


def decode_access_token(token: str, secret: str) -> AccessClaims:
    verified = _verify_signature(token, secret)
    now = int(utcnow().timestamp())
    if verified.expires_at <= now:
        raise TokenError("expired")
    if verified.issued_at > now + _IAT_LEEWAY_SECONDS:
        raise TokenError("issued in the future")
    return verified.claims


def new_opaque_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def token_digest(token: str) -> bytes:
    """SHA-256 of a high-entropy token: the only form stored at rest."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)
