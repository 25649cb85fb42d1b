"""Offset/limit paging parameters shared by every list endpoint (API.md §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query


@dataclass(frozen=True)
class Page:
    offset: int
    limit: int


async def page_params(
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="Rows to return (1-100)")] = 20,
) -> Page:
    return Page(offset=offset, limit=limit)


PageParams = Annotated[Page, Depends(page_params)]
