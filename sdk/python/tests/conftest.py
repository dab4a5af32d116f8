import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import copy_adapter, spawn, wait_healthy  # noqa: E402


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """A folder holding a copy of the package's files (what deployd puts on the path)."""
    return copy_adapter(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def serve(site, logs):
    """`serve(import_path, **spawn_kwargs)` → a healthy adapter, shared by the whole session."""
    started = {}

    def start(import_path, **kwargs):
        key = (import_path, repr(sorted(kwargs.items())))
        if key not in started:
            adapter = spawn(site, logs, import_path, **kwargs)
            wait_healthy(adapter)
            started[key] = adapter
        return started[key]

    yield start
    for adapter in started.values():
        adapter.stop()
