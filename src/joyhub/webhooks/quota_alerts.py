"""Quota thresholds (`quota.threshold_reached`, API.md §11), decided inside the settle statement.

`QUOTA_ALERT_CTES` is a fragment of CTEs that the settle statement (`tools/metering.py`) embeds, so
that a threshold is decided and its event written in the same statement — the same transaction
and the same round trip — as the tokens that cross it.

What the fragment expects from the statement around it
------------------------------------------------------
- a CTE named `sub`: the subscription rows the settle just charged (one per account in the
  batch), with columns
  `id` (uuid), `user_id` (uuid), `org_id` (uuid, for an organization's subscription),
  `tokens_before` (bigint, `tokens_used` before this settle),
  `tokens_used` (bigint, after it), `token_limit` (bigint, the plan's limit),
  `current_period_start` and `current_period_end` (timestamptz);
- a bound parameter `:now` (timestamptz): when the settle happened.

What it does
------------
- `quota_crossing`: keeps `sub` only when the settle crossed some whole percentage of the limit
  (pure arithmetic on the row: the settles that cross nothing, nearly all of them, stop here and
  never read the preferences);
- `quota_crossed`: the user's thresholds (`notification_preferences`, default [80, 100]) with
  `tokens_before < t% ≤ tokens_used`;
- `quota_alerted`: inserts `(subscription, period_start, threshold)` into `quota_alerts` with
  `ON CONFLICT DO NOTHING`, so a threshold fires at most once per period even if the limit or the
  thresholds change mid-period;
- `quota_events`: one `webhook_events` row per threshold that got through (the outbox; its
  trigger wakes the dispatcher at commit, which also queues the email when `quota_email` is on).

Why exactly once under any concurrency: the settle's `sub` UPDATE takes the subscription's row
lock, so settles of one subscription run one after another, each seeing the previous one's
`tokens_used`; `tokens_used` only grows within a period, so exactly one settle has
`tokens_before < t% ≤ tokens_used` for each threshold — no extra round trip, no advisory lock.
"""

from __future__ import annotations

from joyhub.models.notification import DEFAULT_THRESHOLDS
from joyhub.webhooks.events import QUOTA_THRESHOLD_REACHED


def iso_utc_sql(expr: str) -> str:
    """SQL rendering a timestamptz as the API writes timestamps (`core.clock.iso_utc`):
    UTC with a `Z`, and a fraction only when there is one."""
    utc = f"({expr}) AT TIME ZONE 'UTC'"
    return (
        f"CASE WHEN date_trunc('second', {utc}) = {utc}"
        f""" THEN to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
        f""" ELSE to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END"""
    )


_DEFAULTS = ", ".join(str(t) for t in DEFAULT_THRESHOLDS)

QUOTA_ALERT_CTES = f"""
    quota_crossing AS (
        SELECT sub.id, sub.user_id, sub.org_id, sub.tokens_before, sub.tokens_used, sub.token_limit,
               sub.current_period_start, sub.current_period_end
        FROM sub
        WHERE sub.token_limit > 0
          AND sub.tokens_used * 100 / sub.token_limit > sub.tokens_before * 100 / sub.token_limit
    ), quota_crossed AS (
        SELECT c.*, t.threshold
        FROM quota_crossing AS c
        LEFT JOIN notification_preferences AS np ON np.user_id = c.user_id
        CROSS JOIN LATERAL unnest(COALESCE(np.thresholds, ARRAY[{_DEFAULTS}]::smallint[])) AS t(threshold)
        WHERE c.tokens_before * 100 < t.threshold * c.token_limit
          AND c.tokens_used * 100 >= t.threshold * c.token_limit
    ), quota_alerted AS (
        INSERT INTO quota_alerts (subscription_id, period_start, threshold, created_at)
        SELECT id, current_period_start, threshold, CAST(:now AS timestamptz) FROM quota_crossed
        ON CONFLICT DO NOTHING
        RETURNING subscription_id, threshold
    ), quota_events AS (
        INSERT INTO webhook_events (id, type, user_id, org_id, data, created_at)
        SELECT gen_random_uuid(), '{QUOTA_THRESHOLD_REACHED}', c.user_id, c.org_id,
               jsonb_strip_nulls(jsonb_build_object(
                   'subscription_id', c.id, 'user_id', c.user_id, 'org_id', c.org_id,
                   'threshold', c.threshold, 'token_limit', c.token_limit, 'tokens_used', c.tokens_used,
                   'period_end', {iso_utc_sql("c.current_period_end")})),
               CAST(:now AS timestamptz)
        FROM quota_alerted AS a
        JOIN quota_crossed AS c ON c.id = a.subscription_id AND c.threshold = a.threshold
        RETURNING 1
    )
"""  # noqa: S608 (constants of ours; every value is a bound parameter or a column)
