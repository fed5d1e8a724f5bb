from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

T = TypeVar("T")

# Every request body's models: an unknown field is refused, and so is a number that is not finite (Python's json
# reads Infinity and NaN, and the SDKs send them: a job would store what Postgres's JSON cannot hold, or train on it).
REQUEST_MODEL = ConfigDict(extra="forbid", allow_inf_nan=False)


class ListPage(BaseModel, Generic[T]):
    """The OpenAI list envelope; the SDK pages with after=data[-1].id until has_more is false."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class OmitsUnsetOptionals(BaseModel):
    """Leaves out the fields named in OMITTED_WHEN_NONE when they are None: OpenAI's schema lets them be absent
    but not null (a file's status_details, an event's data), so strict clients reject a null."""

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.OMITTED_WHEN_NONE:
            if data.get(name, "") is None:
                del data[name]
        return data
