"""Who may do what in an organization, as route dependencies (API.md §13): a route's signature
names the least role it needs (`OrgMember`, `OrgAdmin`, `OrgOwner`). The membership is resolved
first, so an outsider gets 404 before any role is looked at; a member below the role gets 403."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from joyhub.auth.dependencies import AccessTokenUser, CurrentUser
from joyhub.core.db import DbSession
from joyhub.orgs import service
from joyhub.orgs.service import Membership


async def org_membership(org_id: uuid.UUID, session: DbSession, principal: CurrentUser) -> Membership:
    return await service.membership(session, org_id, principal.user)


OrgMember = Annotated[Membership, Depends(org_membership)]


async def org_admin(m: OrgMember) -> Membership:
    return service.require(m, "admin", "do this")


async def org_owner(m: OrgMember) -> Membership:
    return service.require(m, "owner", "do this")


async def org_key_manager(m: OrgMember, principal: AccessTokenUser) -> Membership:
    """Organization keys are credentials: an admin or owner, with an access token (API.md §3)."""
    del principal  # the check is the dependency itself
    return service.require(m, "admin", "manage the organization's API keys")


OrgAdmin = Annotated[Membership, Depends(org_admin)]
OrgOwner = Annotated[Membership, Depends(org_owner)]
OrgKeyManager = Annotated[Membership, Depends(org_key_manager)]
