"""An organization's webhook endpoints (API.md §11's routes under `/orgs/{org_id}/webhooks`, §13):
the same eight routes as a user's, for the organization's subscription events. Role: admin or
owner (an outsider 404, a member 403)."""

from __future__ import annotations

from typing import Any

from joyhub.core.envelope import Envelope
from joyhub.orgs.access import OrgAdmin
from joyhub.webhooks.router import endpoint_routes
from joyhub.webhooks.service import Owner


async def org_webhook_owner(m: OrgAdmin) -> Owner:
    return Owner(m.user, "org", m.org_id)


router = endpoint_routes(org_webhook_owner)

# what the organization adds to every route's answers
RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"model": Envelope[None], "description": "The caller's role may not (a member)"},
    404: {"model": Envelope[None], "description": "No such organization, or the caller is not a member"},
}
