"""The webhook dispatcher: fan out new events, deliver due deliveries, send notification emails.

It runs inside every `joyhub serve` worker (WEBHOOK_DISPATCH_IN_SERVE, on by default) and as
`joyhub deliver` on its own. Any number of them share the work through the database: events and
deliveries are claimed with `FOR UPDATE SKIP LOCKED`, so they never wait on each other and no
delivery is attempted by two of them at once (`deliveries.py`).

When it runs:
- a row trigger on `webhook_events` NOTIFYs `joyhub_webhooks` when an event commits; every
  dispatcher LISTENs on its own connection (outside the pool) and wakes at once;
- when idle it sleeps until the earliest pending delivery is due (a retry), or at most
  WEBHOOK_POLL_SECONDS — the safety net for a missed notification (a lost LISTEN connection, a
  pooler that does not pass NOTIFY on), which also re-runs the fan-out.

How it delivers: up to WEBHOOK_CONCURRENCY attempts in flight per process, each bounded by
ATTEMPT_TIMEOUT_SECONDS, so a receiver that never answers holds one slot for 10 s and nothing
else: claims go on as slots free up (no batch waits for its slowest member), and the outcomes
are written many at a time by a separate recorder. Invocations never wait on any of this: the
dispatcher has its own HTTP connection pool, and only touches the database pool for its short
claim and record statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings
from joyhub.core.egress import EgressPolicy
from joyhub.core.email import EmailSender, sender_for
from joyhub.webhooks import attempt, deliveries, emails, outbox, policy
from joyhub.webhooks.events import NOTIFY_CHANNEL, public_id
from joyhub.webhooks.secret_box import SecretBox, SecretUnreadable, secret_box

log = logging.getLogger("joyhub.webhooks")

CLAIM_BATCH = 100
GAUGE_REFRESH_SECONDS = 5.0
STOP_GRACE_SECONDS = policy.ATTEMPT_TIMEOUT_SECONDS + 1
_KEY_CACHE_MAX = 10_000


class Dispatcher:
    def __init__(
        self, engine: AsyncEngine, settings: Settings, *, email_sender: EmailSender | None = None
    ) -> None:
        self.engine = engine
        self.concurrency = settings.webhook_concurrency
        self.poll_seconds = settings.webhook_poll_seconds
        self.egress = EgressPolicy.from_settings(settings)
        self.email_sender = email_sender or sender_for(settings)
        self._box: SecretBox = secret_box(settings.secret_key())
        self._keys: dict[tuple[uuid.UUID, bytes], bytes] = {}
        self._http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._fan_out_due = True
        self._inflight: set[asyncio.Task[None]] = set()
        self._saturated = False
        self._outcomes: list[deliveries.Outcome] = []
        self._outcomes_ready = asyncio.Event()
        self._emails: asyncio.Task[None] | None = None
        self._gauges_at = 0.0
        self.listening = asyncio.Event()  # set while the LISTEN connection is up (tests wait on it)
        # counts the passes that may have changed something (a fan-out, a record, an email pass),
        # so a test can wait for the dispatcher's next step instead of sleeping
        self.generation = 0
        self._progress = asyncio.Condition()

    # --- waking ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for new events and due deliveries now (NOTIFY, a manual retry, a test)."""
        self._fan_out_due = True
        self._wake.set()

    async def _wait(self, seconds: float) -> bool:
        """Sleep until woken or for `seconds`; True when woken.

        `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` swallows a cancellation
        that arrives as the awaited event fires, and the loop would never stop.
        """
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def _advance(self) -> None:
        async with self._progress:
            self.generation += 1
            self._progress.notify_all()

    async def progressed(self, since: int) -> None:
        """Return once a pass after generation `since` has finished."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.generation > since)

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until cancelled; then let the attempts in flight finish (bounded) and record
        them, so a deploy does not turn them into lease expiries and duplicate deliveries."""
        async with self._session():
            listener = asyncio.create_task(self._listen(), name="joyhub-webhooks-listen")
            recorder = asyncio.create_task(self._record_loop(), name="joyhub-webhooks-record")
            try:
                while True:
                    reraise_if_cancelled()
                    try:
                        await self._step()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        reraise_if_cancelled()
                        log.exception("webhook dispatch step failed; retrying after the poll interval")
                        await self._wait(self.poll_seconds)
            finally:
                listener.cancel()
                await self._finish(recorder)
                with contextlib.suppress(asyncio.CancelledError):
                    await listener  # closes the LISTEN connection (bounded)

    async def _step(self) -> None:
        now = utcnow()
        if self._fan_out_due:
            self._fan_out_due = False
            await outbox.fan_out_all(self.engine, now=now)
            self._send_emails()
            await self._advance()
        want = min(self.concurrency - len(self._inflight), CLAIM_BATCH)
        claimed = await deliveries.claim(self.engine, now=now, limit=want) if want > 0 else []
        for item in claimed:
            self._start(item)
        await self._refresh_gauges()
        if want > 0 and len(claimed) == want:
            return  # perhaps more due: claim again while slots are free
        self._saturated = want == 0
        timeout = self.poll_seconds
        if not self._saturated:
            async with self.engine.connect() as conn:
                due = await deliveries.next_due(conn)
            if due is not None:
                timeout = min(timeout, max((due - utcnow()).total_seconds(), 0.0))
        if not await self._wait(timeout):
            self._fan_out_due = True  # the safety-net poll: catch an event whose NOTIFY was missed

    def _start(self, item: deliveries.Claimed) -> None:
        task = asyncio.create_task(self._attempt(item))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._saturated:
            self._wake.set()  # a slot is free for the next claim

    async def _attempt(self, item: deliveries.Claimed) -> None:
        outcome = await self.attempt_once(item)
        # appended after the await: the recorder swaps the list in the meantime
        self._outcomes.append(outcome)
        self._outcomes_ready.set()

    async def attempt_once(self, item: deliveries.Claimed) -> deliveries.Outcome:
        """Sign and POST one claimed delivery; the outcome to record (never raises)."""
        assert self._http is not None
        try:
            keys = self._signing_keys(item)
            msg_id = public_id(item.event_id)
            body = attempt.payload(msg_id, item.event_type, item.event_created_at, item.event_data)
            result = await attempt.post(self._http, item.url, msg_id, body, keys)
        except SecretUnreadable:
            result = attempt.Attempted(
                False,
                None,
                "the signing secret cannot be read (the server secret changed): rotate the secret",
                "secret_unreadable",
            )
        except Exception:
            log.exception("webhook attempt failed unexpectedly", extra={"delivery_id": str(item.id)})
            result = attempt.Attempted(False, None, "internal error", "error")
        metrics.WEBHOOK_ATTEMPTS.labels(result.outcome).inc()
        return _outcome(item, result)

    def _signing_keys(self, item: deliveries.Claimed) -> list[bytes]:
        keys = [self._open(item.endpoint_id, item.secret)]
        expires = item.previous_secret_expires_at
        if item.previous_secret is not None and expires is not None and expires > utcnow():
            keys.append(self._open(item.endpoint_id, item.previous_secret))
        return keys

    def _open(self, endpoint_id: uuid.UUID, sealed: bytes) -> bytes:
        cached = self._keys.get((endpoint_id, sealed))
        if cached is None:
            if len(self._keys) >= _KEY_CACHE_MAX:
                self._keys.clear()
            cached = self._keys[(endpoint_id, sealed)] = self._box.open(endpoint_id, sealed)
        return cached

    # --- recording -----------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            reraise_if_cancelled()
            await self._outcomes_ready.wait()
            self._outcomes_ready.clear()
            await self._record_pending()
            self._wake.set()  # a retry may now be due sooner than the loop planned to wake
            await self._advance()

    async def _record_pending(self) -> None:
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        try:
            await deliveries.record(self.engine, batch, now=utcnow())
        except Exception:
            reraise_if_cancelled()
            # the claims' leases run out and the deliveries are attempted again: at least once
            log.exception("could not record webhook attempts", extra={"count": len(batch)})

    async def _finish(self, recorder: asyncio.Task[None]) -> None:
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=STOP_GRACE_SECONDS)
        for task in list(self._inflight):
            task.cancel()
        recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recorder
        await self._record_pending()
        if self._emails is not None:
            self._emails.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._emails

    # --- emails, gauges, the HTTP session, LISTEN ------------------------------------------------

    def _send_emails(self) -> None:
        if self._emails is None or self._emails.done():
            self._emails = asyncio.create_task(self._email_pass(), name="joyhub-webhooks-emails")

    async def _email_pass(self) -> None:
        try:
            while await emails.send_due(self.engine, self.email_sender):
                pass
        except Exception:
            reraise_if_cancelled()
            log.exception("notification email pass failed")
        await self._advance()

    async def _refresh_gauges(self) -> None:
        if time.monotonic() - self._gauges_at >= GAUGE_REFRESH_SECONDS:
            await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        """The queue gauges of /metrics, now (the loop does it every GAUGE_REFRESH_SECONDS)."""
        self._gauges_at = time.monotonic()
        async with self.engine.connect() as conn:
            await deliveries.refresh_gauges(conn, utcnow())

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        """The dispatcher's own HTTP pool: no cookies, no proxies from the environment, no
        decompression, a total timeout per attempt, every address checked by the egress policy."""
        self._http = aiohttp.ClientSession(
            connector=self.egress.connector(limit=self.concurrency, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=policy.ATTEMPT_TIMEOUT_SECONDS),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
        )
        try:
            yield
        finally:
            await self._http.close()
            self._http = None

    async def _listen(self) -> None:
        """LISTEN on a connection of its own (outside the pool), reconnecting after a loss."""
        kwargs = _listen_kwargs(self.engine)
        while True:
            reraise_if_cancelled()
            try:
                conn = await asyncpg.connect(**kwargs)
            except Exception as exc:
                reraise_if_cancelled()
                log.warning("webhook LISTEN connection failed; polling", extra={"error": type(exc).__name__})
                await asyncio.sleep(self.poll_seconds)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(_on_notify(lost.set))
            try:
                await conn.add_listener(NOTIFY_CHANNEL, _on_notify(self.wake))
                self.listening.set()
                self.wake()  # anything committed before we listened
                await lost.wait()
                log.warning("webhook LISTEN connection lost; reconnecting")
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await conn.close()
            self.wake()

    # --- one pass, for `joyhub deliver --once` and tests -------------------------------------------

    async def deliver_due(self) -> int:
        """Fan out, then attempt every delivery due now, until none is left; send due emails.
        Returns the attempts made. Used by `joyhub deliver --once`, not by the loop."""
        total = 0
        async with self._session():
            await outbox.fan_out_all(self.engine, now=utcnow())
            while claimed := await deliveries.claim(self.engine, now=utcnow(), limit=self.concurrency):
                outcomes = await asyncio.gather(*(self.attempt_once(c) for c in claimed))
                await deliveries.record(self.engine, list(outcomes), now=utcnow())
                total += len(claimed)
            await self._email_pass()
        return total


def reraise_if_cancelled() -> None:
    """Raise CancelledError if this task is being cancelled. A query cut short by a cancel can
    surface as another exception (a connection error from the driver); a loop that caught it as
    a failure and went on would never stop, and its owner would wait for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _outcome(item: deliveries.Claimed, result: attempt.Attempted) -> deliveries.Outcome:
    if result.ok:
        metrics.WEBHOOK_DELIVERIES.labels("succeeded").inc()
        return deliveries.Outcome(item.id, "succeeded", result.status_code, None, None)
    delay = policy.next_attempt_delay(item.attempts)
    if delay is None:
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        return deliveries.Outcome(item.id, "failed", result.status_code, result.error, None)
    retry_at: datetime = utcnow() + delay
    return deliveries.Outcome(item.id, "pending", result.status_code, result.error, retry_at)


def _on_notify(action: Callable[[], None]) -> Callable[..., None]:
    """An asyncpg listener callback (whatever it is passed) that runs `action`."""

    def callback(*_: Any) -> None:
        action()

    return callback


def _listen_kwargs(engine: AsyncEngine) -> dict[str, Any]:
    """asyncpg.connect's arguments for the engine's database (SQLAlchemy's own translation of
    the URL, less what asyncpg.connect does not take)."""
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    accepted = inspect.signature(asyncpg.connect).parameters
    out = {k: v for k, v in kwargs.items() if k in accepted}
    out["timeout"] = 5
    out["server_settings"] = {"application_name": "joyhub-webhooks"}
    return out
