"""Admin routes: stats (API.md §7)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
