"""Fixtures of the worker tests."""

from __future__ import annotations

import pytest

from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import create_storage
from ourvidz_serve.storage.local import LocalStorage


@pytest.fixture
def local_storage(settings: Settings) -> LocalStorage:
    storage = create_storage(settings)
    assert isinstance(storage, LocalStorage)
    return storage
