"""Wire models of the admin API: keys and projects across tenants (workers are in app/schemas/workers.py)."""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, Field, StrictBool, field_validator

from app.schemas.common import REQUEST_MODEL, ListPage


class ApiKeyCreate(BaseModel):
    model_config = REQUEST_MODEL

    # The project is created on first use, as with `tuneforge keys create`.
    project: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str = Field(default="", max_length=128)
    is_admin: StrictBool = False

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        # A label shown in listings and the CLI's tables: control characters and bidirectional overrides would let
        # one key's name pass for another's there.
        if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in value):
            raise ValueError("name must not contain control characters or bidirectional text controls")
        return value


# Unicode's explicit bidirectional formatting characters (marks, embeddings, overrides, isolates).
BIDI_CONTROLS = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class ApiKeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    project_id: str
    project: str
    # The first characters only, to tell keys apart; the key itself is never shown again.
    key_prefix: str
    is_admin: bool
    created_at: int
    revoked_at: int | None


class ApiKeyCreated(ApiKeyPublic):
    """The new key, in full: shown in this response only."""

    key: str


class ApiKeyList(ListPage[ApiKeyPublic]):
    pass


class ProjectPublic(BaseModel):
    id: str
    object: Literal["project"] = "project"
    name: str
    created_at: int


class ProjectList(ListPage[ProjectPublic]):
    pass
