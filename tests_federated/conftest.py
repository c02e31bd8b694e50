"""Runs in the federated virtualenv (.venv-fed): same hermetic setup as tests/ (offline, own cache)."""

from tests.conftest import lmkit_cache  # noqa: F401  (autouse session fixture)
