"""Fixtures of the adversarial suite: the figures recorder (see `figures.py`)."""

from __future__ import annotations

import pytest

from tests.chaos.figures import Recorder


@pytest.fixture(scope="session")
def figures() -> Recorder:
    return Recorder.from_env()
