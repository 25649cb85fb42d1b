"""HTTP routes of the auth domain (thin: parse, call the service, wrap in the envelope)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
