"""The GPU benchmark script keeps working: its --tiny CPU run completes every section and prints every rate."""

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATES = ["datastore_entries_per_s", "targets_exact_queries_per_s"]  # count ÷ elapsed time: positive by construction
# differences and ratios of timings are noise in a tiny CPU run (fit's rate is a difference of two runs' times)
TIMED = ["fit_tokens_per_s", "memdec_generation_overhead", "knnlm_generation_overhead",
         "knnlm_to_memdec_generation_overhead"]  # fmt: skip


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "true", "--workdir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert not [k for k in lines if k.endswith("_error")], result.stdout
    for name in RATES:
        assert float(lines[name]) > 0, name
    for name in TIMED:  # present and finite is what CI can check without asserting on wall-clock time
        assert math.isfinite(float(lines[name])), name
    assert list(lines)[-1] == "knnlm_to_memdec_generation_overhead"  # the headline is last


def test_scale_benchmark_runs_tiny(tmp_path):
    """benchmarks/scale.py at n = 20,000 (Flat indexes): every figure present and finite, the ratio last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--n", "20000", "--queries", "2000", "--workdir",
           str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line and line[0] != "#")
    for size in (20000, 80000):
        for name in ("index_entries_per_s", "recall_at_64", "targets_queries_per_s"):
            assert float(lines[f"n{size}_{name}"]) > 0, (size, name)
        for r in (0, 1):
            for name in ("peak_rss_mb", "peak_rss_ex_index_mb", "peak_anon_mb", "peak_file_mb", "baseline_mb"):
                assert math.isfinite(float(lines[f"n{size}_targets_rank{r}_{name}"])), (size, r, name)
    assert float(lines["n20000_recall_at_64"]) == 1.0  # Flat below 200k keys: exact
    assert math.isfinite(float(lines["peak_rss_ratio"])) and list(lines)[-1] == "peak_rss_ratio"
