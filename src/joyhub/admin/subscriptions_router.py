"""Admin routes: granting a plan to a user (API.md §7, `PUT /admin/users/{id}/subscription`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
