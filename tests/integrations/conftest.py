"""Shared pieces of the integration tier: tiny models and data built in code (no downloads)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test here needs transformers or lightning: `-m "not integrations"` leaves the tier out where they are
    # installed (make test-integrations installs them into the project's virtualenv).
    for item in items:
        if "tests/integrations/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integrations)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integrations: needs the `integrations` extra (transformers, accelerate, lightning)"
    )
