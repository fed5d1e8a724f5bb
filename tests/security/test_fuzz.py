"""Schemathesis against the app's own OpenAPI schema, in process, with valid keys.

Every operation gets a bounded number of generated requests (TUNEFORGE_FUZZ_EXAMPLES, default 20):
zero 5xx, zero responses that break their documented schema, and nothing of project A's in any
answer to project B's key, even when B asks for A's ids.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.security.conftest import ProjectAObjects

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "20"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Per operation: generated cases, cases with A's ids swapped in, and status codes seen.
STATS: Counter[str] = Counter()


@dataclass
class FuzzTarget:
    schema: Any
    headers: dict[str, str]
    project_a: ProjectAObjects


@contextmanager
def _fuzz_app(session: Any, project_a: ProjectAObjects, *, admin: bool) -> Iterator[FuzzTarget]:
    """The app with a fresh session per request (on the test's connection) and the rate limit off."""
    from sqlalchemy.orm import Session

    from app.api.deps import current_settings, get_session
    from app.api.routes.stream import get_poll_sessions
    from app.core.config import get_settings
    from app.main import app
    from app.services.projects import create_api_key

    _row, key = create_api_key(session, project_name="team-b", is_admin=admin)
    session.commit()
    connection = session.connection()

    def per_request() -> Iterator[Session]:
        db = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield db
        finally:
            db.close()  # rolls back whatever the request left uncommitted, as a real request's session does

    @contextmanager
    def poll_session() -> Iterator[Session]:
        yield from per_request()

    # No hub source is allowed: a generated `hf:` model is refused (400) before any request to the Hub, which
    # this sandbox cannot reach (the fuzz is about our answers, not the network's).
    unlimited = get_settings().model_copy(update={"rate_limit_per_minute": 0, "model_sources": "path:/nowhere/*"})
    app.dependency_overrides.update({get_session: per_request, current_settings: lambda: unlimited,
                                     get_poll_sessions: lambda: poll_session})
    try:
        yield FuzzTarget(schema=schemathesis.openapi.from_asgi("/openapi.json", app),
                         headers={"Authorization": f"Bearer {key}"}, project_a=project_a)
    finally:
        app.dependency_overrides.clear()


@pytest.fixture
def project_fuzz(session: Any, project_a: ProjectAObjects) -> Iterator[FuzzTarget]:
    with _fuzz_app(session, project_a, admin=False) as target:
        yield target


@pytest.fixture
def admin_fuzz(session: Any, project_a: ProjectAObjects) -> Iterator[FuzzTarget]:
    with _fuzz_app(session, project_a, admin=True) as target:
        yield target


def _text(response: Any) -> str:
    return response.content.decode("utf-8", "replace") if response.content else ""


def _assert_nothing_of_a(response: Any, a: ProjectAObjects, *, asked: str) -> None:
    text = _text(response)
    for object_id in a.all_ids:
        if object_id and object_id not in asked:
            assert object_id not in text, f"project B saw A's {object_id} in {response.request.url}"


def run_case(case: Any, fuzz: FuzzTarget, *, swap_in_a: bool) -> None:
    """Call and validate one case; with swap_in_a, B's answers must hold nothing of A's (admin keys may)."""
    label = f"{case.operation.method.upper()} {case.operation.path}"
    response = case.call_and_validate(headers=fuzz.headers, checks=CHECKS)
    STATS[f"cases {label}"] += 1
    STATS[f"status {response.status_code}"] += 1
    if not swap_in_a:
        return
    _assert_nothing_of_a(response, fuzz.project_a, asked="")
    if case.path_parameters:
        # The generator cannot guess A's ids: ask for them outright, keeping the generated rest.
        ids = fuzz.project_a.path_ids
        case.path_parameters = {k: ids.get(k, v) for k, v in case.path_parameters.items()}
        swapped = case.call_and_validate(headers=fuzz.headers, checks=CHECKS)
        STATS[f"swapped {label}"] += 1
        assert swapped.status_code in (400, 403, 404, 405, 413), (label, swapped.status_code, _text(swapped))
        _assert_nothing_of_a(swapped, fuzz.project_a, asked=str(swapped.request.url))


FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])


def fuzz_operations(schema: Any, fuzz: FuzzTarget, *, swap_in_a: bool) -> list[str]:
    """Run every operation in both generation modes; the failures, one line each (after shrinking)."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Plain string path parameters have no invalid values: negative cases need a body or a query.
        modes = list(GenerationMode) if len(operation.body) or len(operation.query) else [GenerationMode.POSITIVE]
        for mode in modes:
            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz_one(case: Any) -> None:
                run_case(case, fuzz, swap_in_a=swap_in_a)

            try:
                fuzz_one()
            except Unsatisfiable:
                STATS["unsatisfiable"] += 1  # nothing of that mode can be generated for this operation
            except Exception as exc:  # keep going: report every operation's failure, not just the first
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:2000]}")
    return failures


def report() -> str:
    cases = sum(v for k, v in STATS.items() if k.startswith("cases "))
    swapped = sum(v for k, v in STATS.items() if k.startswith("swapped "))
    statuses = {k: v for k, v in sorted(STATS.items()) if k.startswith("status ")}
    return f"fuzz: {cases} generated cases, {swapped} with project A's ids swapped in, {statuses}"


def test_fuzz_project_routes_with_project_b_key(project_fuzz: FuzzTarget) -> None:
    failures = fuzz_operations(project_fuzz.schema.exclude(path_regex="^/v1/admin"), project_fuzz, swap_in_a=True)
    print(report())
    assert not failures, "\n\n".join(failures)


def test_fuzz_admin_routes_with_an_admin_key(admin_fuzz: FuzzTarget) -> None:
    failures = fuzz_operations(admin_fuzz.schema.include(path_regex="^/v1/admin"), admin_fuzz, swap_in_a=False)
    print(report())
    assert not failures, "\n\n".join(failures)
