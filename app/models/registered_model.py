from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONType, KeyedMixin, now_seconds

# A model's life: registered (row written, files not read yet) -> ready, or error (with its message).
MODEL_STATUSES = ("registered", "ready", "error")


class RegisteredModel(KeyedMixin, Base):
    """A base model jobs may name: a Hugging Face Hub repository pinned to a commit, or a local folder.

    Owned by app/services/base_models.py. Workers fetch the weights of hub models into their own cache
    (worker/model_cache.py); the API host keeps only what it reads here (metadata and tokenizer files).
    """

    __tablename__ = "registered_models"

    # What jobs say in `model`.
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # "hf:ORG/NAME" or "path:/absolute/folder".
    source: Mapped[str] = mapped_column(String(1024))
    # The revision asked for (tag, branch or commit); None means the repository's default branch.
    revision: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The commit the revision resolved to when registered: every worker downloads exactly this.
    commit_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False)
    # Pickle weights (.bin/.pt) run code when loaded: fetched only when the operator allowed it.
    allow_pickle: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="registered")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Read from the model: architecture, parameters, hidden_size, layers, vocab_size, context_length,
    # torch_dtype, bytes, has_chat_template, license.
    info: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # What a worker fetches and verifies: [{"name", "size", "sha256" (LFS files) or "git_sha1"}].
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # The tokenizer files' text by name: the API counts tokens at upload time without the weights.
    tokenizer: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    owned_by: Mapped[str] = mapped_column(String(255), default="tuneforge")
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)

    @property
    def hub_repo(self) -> str | None:
        return self.source.removeprefix("hf:") if self.source.startswith("hf:") else None

    @property
    def local_path(self) -> str | None:
        return self.source.removeprefix("path:") if self.source.startswith("path:") else None
