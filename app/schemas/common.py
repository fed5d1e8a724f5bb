from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    """The OpenAI list envelope; the SDK pages with after=data[-1].id until has_more is false."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
