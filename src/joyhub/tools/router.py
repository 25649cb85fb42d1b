"""HTTP routes of the tools domain (thin: parse, call the service, wrap in the envelope)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
