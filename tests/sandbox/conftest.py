"""Fixtures for the sandbox marketplace tests: a sandbox, the SDK and a key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import vastai
from sandbox_helpers import KeyPair

from vastai_pool.sandbox import Sandbox


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(boot_seconds=0.3, state_dir=tmp_path / "sandbox") as sb:
        yield sb


@pytest.fixture
def client(sandbox: Sandbox) -> vastai.VastAI:
    return vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)


@pytest.fixture
def key_pair(tmp_path: Path) -> KeyPair:
    return KeyPair(tmp_path, "pool_key")
