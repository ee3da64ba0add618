"""The serving tests' tiny bases: the step is tested on what the server loads."""

from tests.serve.conftest import bases  # noqa: F401
