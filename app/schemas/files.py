from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.schemas.common import ListPage, OmitsUnsetOptionals

FilePurpose = Literal["fine-tune", "fine-tune-results"]
# The roles a chat example's (or a pair's) messages may take. "developer" is OpenAI's newer name for the system
# message; chat templates know only "system", so training, token counts and inference render it as that.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


# How the worker reads an uploaded JSONL file: UTF-8, with or without a leading byte-order mark (the upload's
# validation accepts one: app/services/datasets.py).
JSONL_ENCODING = "utf-8-sig"


def template_role(role: str) -> str:
    """The role a chat template renders a message of `role` as."""
    return "system" if role == "developer" else role


def template_messages(messages: list[Any]) -> list[Any]:
    """Messages as a chat template renders them: each role through template_role (a message without a string role
    is left as it is, for the template's own error)."""
    return [{**m, "role": template_role(m["role"])} if isinstance(m, dict) and isinstance(m.get("role"), str) else m
            for m in messages]


class FilePublic(OmitsUnsetOptionals):
    OMITTED_WHEN_NONE = ("status_details",)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    # Extension: the sha256 of the content, so clients can verify downloads.
    sha256: str


class FileList(ListPage[FilePublic]):
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileValidationReport(BaseModel):
    """Extension: the full validation report of a fine-tune dataset."""

    id: str
    object: Literal["file.validation_report"] = "file.validation_report"
    status: str
    report: dict[str, Any] | None


def tools_problem(tools: Any) -> str | None:
    """Why an example's tool definitions cannot go to a chat template, or None: transformers takes a list of objects
    (JSON schemas, {"type": "function", "function": {...}}); the upload's validator and the trainer both ask this."""
    if tools is None or (type(tools) is list and all(type(tool) is dict for tool in tools)):
        return None
    return "must be a list of tool definitions (objects)"
