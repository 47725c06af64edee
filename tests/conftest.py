"""Fixtures shared by every test module."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

# The SSH server fixtures live in their own module; collection must still
# work while that module does not exist.
if importlib.util.find_spec("tests.sshd") is not None:
    pytest_plugins = ["tests.sshd"]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A started sandbox marketplace with a 0.3 s boot delay, stopped afterwards.

    Each test gets its own, so ledger counts belong to that test alone.
    """
    # Imported here so that modules not using the sandbox still collect
    # when the sandbox package fails to import.
    from vastai_pool.sandbox import Sandbox

    marketplace = Sandbox(boot_seconds=0.3)
    marketplace.start()
    try:
        yield marketplace
    finally:
        marketplace.stop()
