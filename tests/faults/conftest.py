from tests.integration.conftest import service  # noqa: F401  (the same real processes)
