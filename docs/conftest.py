"""The doctests of docs/ pages that run optional peers need them installed.

`make test` installs every peer (the `bench` extra and BackPACK), so nothing is skipped there;
an environment without them (the compatibility run installs only torch and the test tools)
skips those pages, saying which package is missing.
"""

from __future__ import annotations

import importlib.util

import pytest

# page -> the optional packages its examples import
NEEDS = {"migration.md": ("torchjd", "backpack")}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        missing = [m for m in NEEDS.get(item.path.name, ()) if importlib.util.find_spec(m) is None]
        if missing and "docs" in item.path.parts:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (optional peers)"))
