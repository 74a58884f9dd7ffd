"""Fixtures of the reliability suite (helpers the tests import live in support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import FAULT_SERVINGS, SERVINGS, EchoProcess, Serving


@pytest.fixture(params=SERVINGS, ids=[serving.name for serving in SERVINGS])
def serving(request: pytest.FixtureRequest) -> Serving:
    """Threading mode, forking mode, and threading with two worker processes."""
    return request.param


@pytest.fixture
def echo_process() -> Iterator[EchoProcess]:
    target = EchoProcess()
    yield target
    target.close()


@pytest.fixture(params=FAULT_SERVINGS, ids=[serving.name for serving in FAULT_SERVINGS])
def fault_serving(request: pytest.FixtureRequest) -> Serving:
    """Threading and forking mode (and, in a full run, two workers)."""
    return request.param
