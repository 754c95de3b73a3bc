"""benchmarks/bench_batch_norm_pool.py runs (--quick) and writes a table whose float64 agreement is tight."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_batch_norm_pool  # noqa: E402


def test_quick_run_writes_agreeing_rows(tmp_path):
    out = tmp_path / "bn.json"
    bench_batch_norm_pool.main(["--device", "cpu", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert set(row["ms"]) == {"forward", "first order", "second order"}
    assert all(v < 1e-10 for v in row["agreement"].values())
    assert "| one task [2, 4, 8, 8] | second order |" in out.with_suffix(".md").read_text()
