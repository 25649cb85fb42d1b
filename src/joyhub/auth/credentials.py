"""What a request presents as its credential, and the one rule that says whether it is still good.

A `Credential` is checked as far as it can be without the database: an access token's signature
and expiry are verified (`user_id`, `session_id` set); an API key is only well-formed
(`api_key_digest` set, the form stored at rest). Whether the session is still live, the key still
active and unexpired, and the user still enabled is the database's to say, by one SQL rule:
`CREDENTIAL_USERS`. It is written once, here, and used by everything that authenticates:

- the principal dependencies of every route (`auth.dependencies.current_principal`), which join it
  to the user row;
- `confirm`, for a request refused before its own statement could check the credential;
- the gateway's admission statement (`tools/metering.py`), which folds it into its one round trip.

This module does not import FastAPI: the gateway uses it as domain code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.errors import InvalidToken

# an API key's `last_used_at` is written at most once per interval, not once per request
API_KEY_TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Credential:
    """The credential a request presents, checked as far as it can be without the database."""

    user_id: uuid.UUID | None = None
    session_id: uuid.UUID | None = None
    api_key_digest: bytes | None = None
    # the organization the request asks to bill (`X-Org-ID`, API.md §13): part of the credential
    # so that every surface (JSON invoke, the OpenAI adapter, …) gets the billing rule for free
    org_id: uuid.UUID | None = None

    @property
    def is_api_key(self) -> bool:
        return self.api_key_digest is not None

    def params(self, now: datetime) -> dict[str, Any]:
        """The bound parameters of `CREDENTIAL_USERS` for this credential at `now`."""
        return {
            "cred_session_id": self.session_id,
            "cred_user_id": self.user_id,
            "cred_key_digest": self.api_key_digest,
            "cred_org_id": self.org_id,
            "now": now,
        }


# The rule, as SQL with named parameters (`:cred_session_id`, `:cred_user_id`, `:cred_key_digest`,
# `:cred_org_id`, `:now`): the user of a live session of that very user, or of an active,
# unexpired API key; the user enabled; an organization's key only while its user is a member of
# that (undeleted) organization — so a member who leaves loses their organization keys at once,
# on every instance, whatever else happens to the key rows. At most one row — a credential has a
# session or a key digest, never both, and both lookups go through unique keys. Columns:
# `user_id`, `api_key_id` (null for a session), `key_last_used_at` (for the once-a-minute stamp)
# and `org_id`: the organization the call bills — an organization key's own, else the one asked
# for with `X-Org-ID` (membership is the admission's to check: asking is not billing). Statements
# embed it as a subquery or CTE body.
def credential_users(
    session_id: str,
    user_id: str,
    key_digest: str,
    org_id: str,
    now: str = ":now",
    *,
    sessions: bool = True,
    keys: bool = True,
) -> str:
    """The rule with the credential's parts taken from these SQL expressions: bound parameters
    (`CREDENTIAL_USERS`), or the columns of a batch of credentials (the gateway's admission
    statement checks the credentials of many callers at once, `tools/metering.py`). A batch with
    no access token (`sessions=False`) or no API key (`keys=False`) leaves that half out: it could
    only find nothing, and every part of a statement costs PostgreSQL its start-up."""
    session_rule = f"""
    SELECT u.id AS user_id, CAST(NULL AS uuid) AS api_key_id,
           CAST(NULL AS timestamptz) AS key_last_used_at, CAST({org_id} AS uuid) AS org_id
    FROM auth_sessions AS a JOIN users AS u ON u.id = a.user_id
    WHERE a.id = {session_id} AND u.id = {user_id} AND a.revoked_at IS NULL AND u.is_active"""  # noqa: S608 (SQL of ours)
    key_rule = f"""
    SELECT u.id AS user_id, k.id AS api_key_id, k.last_used_at AS key_last_used_at,
           COALESCE(k.org_id, CAST({org_id} AS uuid)) AS org_id
    FROM api_keys AS k JOIN users AS u ON u.id = k.user_id
    WHERE k.key_hash = {key_digest} AND k.is_active
      AND (k.expires_at IS NULL OR k.expires_at > {now}) AND u.is_active
      AND (k.org_id IS NULL OR EXISTS (
            SELECT 1 FROM organization_members AS km JOIN organizations AS ko ON ko.id = km.org_id
            WHERE km.org_id = k.org_id AND km.user_id = k.user_id AND ko.deleted_at IS NULL))"""  # noqa: S608
    rules = [rule for rule, wanted in ((session_rule, sessions), (key_rule, keys)) if wanted]
    return "\n    UNION ALL".join(rules) + "\n"


CREDENTIAL_USERS = credential_users(":cred_session_id", ":cred_user_id", ":cred_key_digest", ":cred_org_id")

_CONFIRM = text(CREDENTIAL_USERS)


async def confirm(engine: AsyncEngine, credential: Credential) -> None:
    """401 unless the credential is still good: for a request refused before its own statement
    could check it (a validation error), so authentication still answers first (API.md §5)."""
    async with engine.connect() as conn:
        found = (await conn.execute(_CONFIRM, credential.params(utcnow()))).first()
    if found is None:
        raise InvalidToken()
