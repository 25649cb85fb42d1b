"""Checks of the streaming benchmark's own parts: the load generator's HTTP and SSE parsing, the
mock upstream it reads, and the accounting verdict. A benchmark that miscounts would report
figures, or an "exact" ledger, that mean nothing.

Not part of `make test` (its testpaths are the hub's tests):
    .venv/bin/python -m pytest bench/load/test_sse_bench.py -q
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from sse_loadgen import Dechunker, Report, Spec, _events, _StreamState, run_streams  # noqa: E402
from sse_upstream import event, sse_upstream, whole_answer  # noqa: E402
from stream_bench import Shape, accounting  # noqa: E402


def _chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


def _pieces(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 7)
        out.append(data[pos : pos + step])
        pos += step
    return out


HUB_STREAM = (
    b'event: chunk\ndata: {"i":0,"ts":1.5}\n\n',
    b": ping\n\n",
    b'event: chunk\ndata: {"i":1,"ts":1.5,"usage":{"total_tokens":2}}\n\n',
    b'event: done\ndata: {"invocation_id":"x","status":"success","tokens_used":2}\n\n',
)


@pytest.mark.parametrize("seed", range(20))
def test_dechunker_any_split(seed: int) -> None:
    body = _chunked(*HUB_STREAM)
    d = Dechunker()
    got = []
    pieces = _pieces(body, random.Random(seed))
    for i, piece in enumerate(pieces):
        got.append(d.feed(piece))
        assert d.done == (i == len(pieces) - 1)  # done only once the empty trailer line is in
    assert b"".join(got) == b"".join(HUB_STREAM)


@pytest.mark.parametrize("seed", range(20))
def test_hub_events_any_split(seed: int) -> None:
    spec = Spec("http://127.0.0.1:1/x", [{}], "{}", "hub", delays=True)
    out, state, pending = Report(), _StreamState(), b""
    for piece in _pieces(b"".join(HUB_STREAM), random.Random(seed)):
        pending = _events(piece, pending, state, spec, out, now_wall=2.0)
    assert (state.chunks, state.ended, out.pings, out.tokens_done) == (2, "done", 1, 2)
    assert out.delay_ms == [500.0, 500.0]


def test_hub_error_event_is_the_ending() -> None:
    spec = Spec("http://127.0.0.1:1/x", [{}], "{}", "hub")
    out, state = Report(), _StreamState()
    frames = HUB_STREAM[0] + b'event: error\ndata: {"code":"TOOL_TIMEOUT","tokens_used":1}\n\n'
    assert _events(frames, b"", state, spec, out, 0.0) == b""
    assert (state.chunks, state.ended, out.tokens_done) == (1, "TOOL_TIMEOUT", 0)


def test_mock_events_report_usage_last() -> None:
    n = 4
    body = whole_answer(n).split(b"\r\n\r\n", 1)[1]
    payload = Dechunker().feed(body)
    events = payload.split(b"\n\n")[:-1]
    assert len(events) == n + 1 and events[-1] == b"data: [DONE]"
    assert all(b'"usage"' not in e for e in events[: n - 1])
    assert events[n - 1].endswith(b'"usage":{"total_tokens":4}}')
    assert event(0, 1, 0.0).startswith(b'data: {"i":0,"ts":0.000000,')


def test_loadgen_reads_the_mock() -> None:
    """The real mock in its process, read by the real load generator in its own: every chunk,
    the paced and the burst shapes, keep-alive reuse, plain JSON answers."""
    with sse_upstream() as url:
        burst = run_streams(
            Spec(url + "?chunks=50&interval=0", [{}], "{}", "direct", connections=3, per_connection=4)
        )
        paced = run_streams(
            Spec(url + "?chunks=3&interval=0.01", [{}], "{}", "direct", connections=20, delays=True)
        )
        plain = run_streams(Spec(url + "?chunks=7&plain=1", [{}], "{}", "direct", per_connection=5))
    assert (burst.streams, burst.completed, burst.chunks, burst.errors) == (12, 12, 600, {})
    assert burst.chunks_per_stream == {"50": 12}
    assert (paced.completed, paced.chunks, len(paced.delay_ms), paced.max_open) == (20, 60, 60, 20)
    assert all(d >= 0 for d in paced.delay_ms)
    assert (plain.completed, plain.tokens_done, plain.chunks_per_stream) == (5, 35, {"0": 5})


def _ledger(**kw: int) -> dict[str, int]:
    base = {
        "success": 0,
        "pending": 0,
        "failed": 0,
        "logs": 0,
        "log_tokens": 0,
        "tokens_used": 0,
        "tokens_reserved": 0,
        "inflight": 0,
        "daily_invocations": 0,
        "platform_invocations": 0,
        "daily_tokens": 0,
        "hourly_tokens": 0,
        "user_daily_tokens": 0,
        "user_weekly_tokens": 0,
        "platform_daily_tokens": 0,
    }
    base.update(kw)
    return base


def _after(successes: int, tokens: int, **kw: int) -> dict[str, int]:
    """The ledger after `successes` success logs of `tokens` in all, consistent unless `kw` says."""
    rollups = {k: tokens for k in ("daily_tokens", "hourly_tokens", "user_daily_tokens")}
    rollups |= {"user_weekly_tokens": tokens, "platform_daily_tokens": tokens}
    logs = successes + kw.get("failed", 0)
    values = {"success": successes, "logs": logs, "log_tokens": tokens, "tokens_used": tokens}
    values |= {"daily_invocations": logs, "platform_invocations": logs, **rollups}
    values.update(kw)
    return _ledger(**values)


def _report(streams: int, chunks: int, errors: int = 0) -> Report:
    done = streams - errors
    return Report(
        streams=streams,
        completed=done,
        chunks=done * chunks,
        tokens_done=done * chunks,
        chunks_per_stream={str(chunks): done} if done else {},
        errors={"http 504 TOOL_TIMEOUT": errors} if errors else {},
    )


def test_accounting_exact() -> None:
    check = accounting(_ledger(), _after(10, 50), [(_report(10, 5), Shape(5, 0))])
    assert check["exact"] and check["ledger_consistent"] and check["all_delivered"]


def test_accounting_failed_streams_keep_the_ledger_consistent() -> None:
    after = _after(8, 40, failed=2)
    check = accounting(_ledger(), after, [(_report(10, 5, errors=2), Shape(5, 0))])
    assert check["ledger_consistent"] and not check["all_delivered"] and not check["exact"]


@pytest.mark.parametrize(
    "damage",
    [{"pending": 1}, {"tokens_reserved": 5}, {"inflight": 1}, {"tokens_used": 49}, {"hourly_tokens": 45}],
)
def test_accounting_catches_an_inconsistent_ledger(damage: dict[str, int]) -> None:
    check = accounting(_ledger(), _after(10, 50, **damage), [(_report(10, 5), Shape(5, 0))])
    assert not check["ledger_consistent"] and not check["exact"]


def test_accounting_catches_a_missing_chunk() -> None:
    short = _report(10, 5)
    short.chunks_per_stream = {"5": 9, "4": 1}
    assert not accounting(_ledger(), _after(10, 50), [(short, Shape(5, 0))])["all_delivered"]


def test_probe_phases_split_by_streams_relaying() -> None:
    """Opening until 90 % of the streams relay, steady while they do, closing from the first
    end; one stream that waits long for its first chunk does not stretch the opening."""
    from stream_bench import probe_phases

    firsts = [1.0] * 9 + [20.0]
    report = Report(streams=10, started_at=100.0, first_chunk_s=firsts, ended_s=[30.0] * 9 + [50.0])

    class Probe:
        samples = [(100.5, 1.0), (105.0, 2.0), (125.0, 3.0), (131.0, 4.0)]
        failures = [(102.0, "TimeoutError")]

    phases = probe_phases(Probe(), report)  # type: ignore[arg-type]
    assert [phases[k]["n"] for k in ("opening", "steady", "closing")] == [1, 2, 1]
    assert phases["failures"] == {"TimeoutError": 1} and phases["failures_at_s"] == [2.0]
