"""Shared fixtures: the embedded zoo, built once per cache dir and reused across sessions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def zoo_cache_root() -> Path:
    env = os.environ.get("EVOMERGE_ZOO")
    return Path(env) if env else REPO / ".cache" / "zoo"


# Everything in the test session -- the fixture, `zoo:` references resolved by the search, and
# the `evomerge` subprocesses the tests start -- uses this one zoo.
os.environ["EVOMERGE_ZOO"] = str(zoo_cache_root())


@pytest.fixture(scope="session")
def zoo():
    """The built zoo (built on first use, ~1-2 min on 2 CPU cores; cached afterwards)."""
    from evomerge.zoo import build_zoo

    return build_zoo(root=zoo_cache_root(), verbose=False)


@pytest.fixture
def one_thread():
    """Run a test's torch work on one thread (tiny models: far faster when cores are shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
