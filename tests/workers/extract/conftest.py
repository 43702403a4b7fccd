"""A small sandbox world for the extract tests, made once per session."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SANDBOX_SAMPLES = 300
SANDBOX_SEED = 11


class SandboxWats:
    def __init__(self, directory: Path):
        self.dir = directory
        settings = json.loads((directory / "sandbox.json").read_text())
        self.wats = [str(directory / "wat" / name) for name in sorted(settings["wat_files"])]
        self.truth = pq.read_table(directory / "ground_truth" / "pairs.parquet").to_pylist()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> SandboxWats:
    from clipfleet.sandbox.web import make_sandbox
    directory = tmp_path_factory.mktemp("sandbox")
    make_sandbox(directory, samples=SANDBOX_SAMPLES, port=8471, seed=SANDBOX_SEED)
    return SandboxWats(directory)
