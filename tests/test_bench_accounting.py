"""The benchmark's bookkeeping: which batches belong to a case, and which config it reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench", bench)
_spec.loader.exec_module(bench)


def _snapshot(pid: int, sizes: list[int], total: int) -> dict:
    return {"pid": pid, "batch_sizes": sizes, "batches_total": total}


def test_batches_between_snapshots_are_the_new_ones_only():
    between = bench.TowerStats.batches_between
    assert between(_snapshot(1, [1, 1], 2), _snapshot(1, [1, 1, 4, 4, 2], 5)) == [4, 4, 2]
    # the replica keeps only its latest sizes: a full list of equal sizes still counts right
    assert between(_snapshot(1, [8] * 4096, 5000), _snapshot(1, [8] * 4096, 5200)) == [8] * 200
    assert between(_snapshot(1, [3], 1), _snapshot(1, [3], 1)) == []
    # more batches than the replica remembers, or another replica: unknown, not wrong
    assert between(_snapshot(1, [2] * 10, 10), _snapshot(1, [2] * 10, 30)) is None
    assert between(_snapshot(1, [2], 1), _snapshot(2, [2, 2], 2)) is None
    assert between(None, _snapshot(1, [2], 1)) is None


def test_app_settings_come_from_the_named_application(tmp_path):
    settings = bench.app_settings(ROOT / "configs" / "gpu.yaml")
    assert settings.image.num_replicas == 2 and settings.image.dtype == "fp16"
    other = tmp_path / "other.yaml"
    other.write_text("applications:\n  - name: something-else\n    import_path: x:y\n")
    with pytest.raises(SystemExit, match="no application named"):
        bench.app_settings(other)
