"""Backends a test run must exercise: ``MARTHE_REQUIRE_BACKENDS`` (comma-separated; CI lists
the ones it builds). Any other backend that cannot load here is skipped with its reason."""
from __future__ import annotations

import os

import pytest

from marthe_ext.backends import BackendUnavailable, load_backend

REQUIRED = frozenset(b for b in os.environ.get("MARTHE_REQUIRE_BACKENDS", "").split(",") if b)


def backend_or_skip(name: str):
    """A new instance of backend ``name``; a pytest skip with the stored reason when it cannot
    load here, or the BackendUnavailable error itself when ``name`` is required."""
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        if name in REQUIRED:
            raise
        pytest.skip(str(exc))
