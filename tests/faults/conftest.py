from tests.integration.conftest import service  # noqa: F401  (an instance of its own for this package)
