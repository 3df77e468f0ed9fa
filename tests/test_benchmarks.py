"""The GPU and latency benchmark scripts keep working: their --tiny CPU runs complete and print every headline line."""

import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]  # each runs a benchmark script, tiny: 10-60 s
REPO = Path(__file__).resolve().parents[1]
RATES = ["datastore_entries_per_s", "targets_exact_queries_per_s", "exact_search_queries_per_s",
         "exact_search_coarse_queries_per_s"]  # count ÷ elapsed time: positive by construction  # fmt: skip
# differences and ratios of timings are noise in a tiny CPU run (fit's rate is a difference of two runs' times)
TIMED = ["fit_tokens_per_s", "memdec_generation_overhead", "knnlm_generation_overhead",
         "knnlm_to_memdec_generation_overhead"]  # fmt: skip
HEADLINE = ["exact_targets_qps", "fit_mfu", "memdec_ms_per_token", "memdec_generation_overhead"]


def run_benchmark(cmd: list[str], cwd: Path, timeout: int = 600, skip_comments: bool = False) -> dict[str, str]:
    """Run a benchmark command in ``cwd``; its ``name: value`` lines in print order (``#`` lines left out if asked)."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(": ", 1) for line in result.stdout.splitlines()
                if ": " in line and not (skip_comments and line[0] == "#"))  # fmt: skip


def test_gpu_benchmark_time_limit_still_prints_the_headline(tmp_path):
    """On a device lent for minutes: past --time_limit_s the running stage stops, the rest are skipped, and the
    headline (nan where not measured) is still printed last, with a zero exit code."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "true", "--workdir", str(tmp_path),
           "--time_limit_s", "0.5"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    assert "time limit of 0.5 s was reached" in lines["time_limit"]
    assert list(lines)[-4:] == HEADLINE and math.isnan(float(lines["memdec_generation_overhead"]))


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "true", "--workdir", str(tmp_path)]
    lines = run_benchmark(cmd, tmp_path)
    assert not [k for k in lines if k.endswith("_error")], lines
    for name in RATES:
        assert float(lines[name]) > 0, name
    for name in TIMED:  # present and finite is what CI can check without asserting on wall-clock time
        assert math.isfinite(float(lines[name])), name
    for stage in ("datastore", "targets", "generation", "fit", "search_scale", "beam", "served_batch"):
        assert float(lines[f"{stage}_stage_s"]) > 0, stage  # each stage's wall time, for planning device runs
    assert list(lines)[-4:] == HEADLINE  # the headline, last, in this order
    for name in HEADLINE:
        assert math.isfinite(float(lines[name])), name
    for entries in (3000, 20000):  # kNN-LM's search per token as the store grows: the real store, then synthetic
        assert float(lines[f"knn_search_exact_ms_at_{entries}"]) > 0
        # and where its time goes: the products, the selections beside the library's topk, each finding its values
        assert float(lines[f"search_batch1_at_{entries}_products_ms"]) > 0
        assert float(lines[f"search_batch1_at_{entries}_select_one_stage_ms"]) > 0
        assert all(
            int(lines[f"search_batch1_at_{entries}_select_{name}_equal"]) == 1 for name in ("two_stage", "threshold")
        )
    assert float(lines["exact_targets_qps"]) == float(lines["targets_exact_queries_per_s"])
    # the decoder beside the base (in turn on the CPU, fp32): generate()'s tokens
    assert float(lines["static_memdec_overlap_tokens_equal_eager"]) == 1.0
    assert math.isfinite(float(lines["memdec_overlap_generation_overhead"]))
    # kNN-LM on the same static base, its exact search in the captured step (run in turn on the CPU): its own tokens
    assert float(lines["static_knnlm_tokens_equal_loop"]) == 1.0
    assert math.isfinite(float(lines["knnlm_static_to_memdec_generation_overhead"]))
    # the threshold selection (its torch path here, k = 96 over 4,000 keys) ran and found topk's neighbours
    assert int(lines["targets_threshold_entries_differing_from_topk"]) == 0
    assert float(lines["exact_search_threshold_rows_equal_topk"]) == 1.0
    assert (
        math.isfinite(float(lines["threshold_collect_torch_ms"])) and int(lines["threshold_rows_searched_again"]) >= 0
    )
    assert 0 < float(lines["threshold_mean_keys_under_tau"]) <= int(lines["threshold_capacity"])
    # ‖k‖² folded into the product (two more key columns) gives exact_search's ranking scores
    assert float(lines["search_folded_norms_max_diff_over_max"]) < 1e-5
    # the stored rows made on the device are the bytes stored_rows makes on the host
    assert int(lines["targets_rows_stored_on_device_equal"]) == 1
    # the loss kernels side by side (the row passes in torch here) agree, and fit says which one it trained with
    assert int(lines["loss_rows_equal_chunked"]) == 1 and float(lines["loss_rows_grad_max_abs_diff_over_max"]) < 1e-2
    faster = "rows" if float(lines["loss_rows_speedup"]) > 1 else "chunked"
    assert lines["fit_options"].endswith(f"loss_kernel={faster}")
    # every rate has its roofline: bound = the assumed peak ÷ the work per item, fraction = rate ÷ bound
    peak_flops = float(lines["peak_flops"])
    bound = float(lines["targets_exact_queries_per_s_bound"])
    assert math.isclose(bound, peak_flops / (2 * 3999 * 64), rel_tol=3e-3)  # 2·N·d FLOPs a query, tiny store
    for rate in RATES + ["fit_tokens_per_s"]:
        fraction = float(lines[f"{rate}_roofline_fraction"])
        assert math.isclose(fraction, float(lines[rate]) / float(lines[f"{rate}_bound"]), rel_tol=3e-3), rate
    mfu_flops = 6 * int(lines["fit_decoder_params"]) + 12 * 2 * 64 * 64  # 6N + 12·L·T·d, TINY shapes, window 64
    assert math.isclose(
        float(lines["fit_mfu"]), float(lines["fit_tokens_per_s"]) * mfu_flops / peak_flops, rel_tol=3e-3
    )
    for name in ("base", "memdec"):
        assert (
            0 < float(lines[f"generate_{name}_roofline_fraction"])
            and float(lines[f"generate_{name}_ms_per_token_bound"]) > 0
        )


def test_cross_vocab_benchmark_runs_tiny(tmp_path):
    """benchmarks/cross_vocab.py on tiny families: it read the quickstart report's budget where the report no longer
    kept it (KeyError after both families' training); each recovery is the printed perplexities' ratio."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "cross_vocab.py"), "--workdir", str(tmp_path / "w"),
           "--general_tokens", "6000", "--domain_tokens", "3000", "--eval_tokens", "400", "--window", "16",
           "--batch_size", "4", "--base_steps", "2", "--teacher_steps", "1", "--memdec_steps", "10",
           "--k", "4"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path, timeout=900)
    names = ("own_short", "random", "overlap")
    assert list(lines)[0] == "transfer" and list(lines)[-3:] == [f"{n}_recovery" for n in names]
    assert int(lines["transfer_steps"]) == 1 and int(lines["reference_steps"]) == 10
    for name in names:
        mean = []
        for base in ("base-small", "base-large"):
            ppl = {m: float(lines[f"{base}_{m}_ppl"]) for m in ("reference", name)}
            want = (float(lines[f"{base}_ppl"]) - ppl[name]) / (float(lines[f"{base}_ppl"]) - ppl["reference"])
            assert float(lines[f"{base}_{name}_recovery"]) == pytest.approx(want, abs=2e-3)  # from 2-decimal ppls
            mean.append(float(lines[f"{base}_{name}_recovery"]))
        assert float(lines[f"{name}_recovery"]) == pytest.approx(np.mean(mean), abs=1e-3)


def test_scale_benchmark_runs_tiny(tmp_path):
    """benchmarks/scale.py at n = 20,000 (Flat indexes): every figure present and finite, the ratio last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--n", "20000", "--queries", "2000", "--workdir",
           str(tmp_path)]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path, timeout=900, skip_comments=True)
    for size in (20000, 80000):
        for name in ("index_entries_per_s", "recall_at_64", "targets_queries_per_s"):
            assert float(lines[f"n{size}_{name}"]) > 0, (size, name)
        for r in (0, 1):
            for name in ("peak_rss_mb", "peak_rss_ex_index_mb", "peak_anon_mb", "peak_file_mb", "baseline_mb"):
                assert math.isfinite(float(lines[f"n{size}_targets_rank{r}_{name}"])), (size, r, name)
    assert float(lines["n20000_recall_at_64"]) == 1.0  # Flat below 200k keys: exact
    assert math.isfinite(float(lines["peak_rss_ratio"])) and list(lines)[-1] == "peak_rss_ratio"


def test_latency_benchmark_runs_tiny_on_cpu(tmp_path):
    """Two tiny sizes (the second with synthetic keys): every per-size line, the floor, the headline last, the plot."""
    plot = tmp_path / "latency.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "latency.py"), "--tiny", "true", "--workdir", str(tmp_path),
           "--plot", str(plot)]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    for n in (2000, 8000):
        for case in ("", "large_batch_"):
            for what in ("memdec_overhead", "knnlm_overhead", "search_ms"):
                assert math.isfinite(float(lines[f"size_{n}_{case}{what}"])), (n, case, what)
        assert lines[f"size_{n}_factory"] == "Flat"  # auto plans Flat below 200k entries
    assert float(lines["flops_floor"]) > 1
    for name in ("memdec_to_floor", "knnlm_to_memdec_extra_cost"):  # wall-clock ratios: present and finite
        assert math.isfinite(float(lines[name])), name
    assert list(lines)[-1] == "knnlm_to_memdec_extra_cost"  # the headline is last
    assert plot.stat().st_size > 0
    # the synthetic store keeps the real entries first and copies real values
    from lightning_memdec.io.readers import Datastore

    stores = sorted(tmp_path.glob("datastore-*"), key=lambda p: len(p.name))
    real, synthetic = Datastore(stores[0]), Datastore(stores[1])
    assert (len(real), len(synthetic)) == (2000, 8000)
    assert (synthetic.keys[:2000] == real.keys[:]).all() and set(synthetic.values[2000:]) <= set(real.values[:])
    assert synthetic.meta["synthetic"]["real_entries"] == 2000


@pytest.mark.multiprocess
def test_index_build_benchmark_runs_tiny(tmp_path):
    """benchmarks/index_build.py at n = 20,000: the one-process and 2-rank indexes identical, the speed-up last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "index_build.py"), "--n", "20000", "--dim", "64", "--factory",
           "IVF64,PQ8", "--train_size", "5000", "--chunk_keys", "4096", "--workdir", str(tmp_path)]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path, timeout=900)
    assert lines["index_files_identical"] == "1" and int(lines["keys"]) == 20000
    assert float(lines["one_process_seconds"]) > 0 and float(lines["two_ranks_seconds"]) > 0
    assert float(lines["round0_two_ranks_seconds"]) == float(lines["two_ranks_seconds"])
    assert list(lines)[-1] == "index_build_speedup"


def test_search_backends_benchmark_runs_tiny(tmp_path):
    """benchmarks/search_backends.py at d = 16: the store at auto's CPU edge, each backend timed, the ratio last."""
    from lightning_memdec.retrieval.exact_search import EXACT_CPU_MAX_ELEMENTS, EXACT_CPU_SELECTION_WIDTH

    cmd = [sys.executable, str(REPO / "benchmarks" / "search_backends.py"), "--dims", "[16]", "--queries", "8",
           "--k", "8"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    assert int(lines["keys_d16"]) == EXACT_CPU_MAX_ELEMENTS // (16 + EXACT_CPU_SELECTION_WIDTH)
    assert lines["ivf_index_d16"].startswith("IVF") and float(lines["faiss_flat_ms_per_query_d16"]) > 0
    assert list(lines)[-1] == "exact_over_faiss_at_the_edge"
    assert float(lines["exact_over_faiss_at_the_edge"]) == float(lines["exact_over_fastest_faiss_d16"])


def test_pq_size_benchmark_runs_tiny(tmp_path, biomed_datastore):
    """benchmarks/pq_size.py on a tiny real datastore: each variant's lines; IVF-Flat's distances are exact (its p_kNN
    the same re-ranked or not), the measured memory ratio last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "pq_size.py"), "--datastore", str(biomed_datastore),
           "--queries", "16", "--k", "16", "--sizes", "[4]"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    largest = lines["plan"].split()[0]
    for name in ("pq4", "flat"):
        assert 0 <= float(lines[f"{name}_recall"]) <= 1 and float(lines[f"{name}_loaded_mib"]) >= 0
    assert abs(float(lines["flat_tv"]) - float(lines["flat_tv_reranked"])) < 1e-6, largest
    assert math.isfinite(float(lines["largest_pq_planned_over_flat_memory"]))
    assert list(lines)[-1] == "largest_pq_over_flat_memory"


def test_router_skip_benchmark_runs_tiny(tmp_path):
    """Tiny models, a planted router skipping about half the steps: every line, the headline speed-up last."""
    from conftest import save_tiny

    base, memdec = save_tiny(tmp_path / "base"), save_tiny(tmp_path / "memdec", n_embd=16, n_layer=1, seed=1)
    cmd = [sys.executable, str(REPO / "benchmarks" / "router_skip.py"), "--base", str(base), "--memdec", str(memdec),
           "--prompt_tokens", "16", "--new_tokens", "8", "--repeats", "1"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    for name in ("fixed_tokens_per_s", "router_no_skip_tokens_per_s", "router_skip_tokens_per_s"):
        assert float(lines[name]) > 0, name
    assert 0 < float(lines["decoder_skipped_share"]) < 1  # the planted threshold skips some steps, not all
    assert math.isfinite(float(lines["skip_speedup"])) and list(lines)[-1] == "skip_speedup"


def test_loader_benchmark_runs_tiny(tmp_path):
    """benchmarks/loader.py on tiny shapes, capped support, one worker: the host-padded and CSR batches agree (the
    script checks), every figure present, the CSR batch no larger, the headline last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "loader.py"), "--workdir", str(tmp_path), "--window", "32",
           "--k", "64", "--batch", "2", "--windows", "8", "--max_support", "24", "--num_workers", "1", "--batches",
           "2", "--repeats", "1"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    for name in ("host_loader_batches_per_s", "csr_loader_batches_per_s", "pad_targets_ms"):
        assert float(lines[name]) > 0, name
    assert 0 < float(lines["csr_batch_mbytes"]) <= float(lines["host_batch_mbytes"])
    assert 0 < int(lines["batch_support"]) <= 24 and float(lines["support_mean"]) > 1
    assert math.isfinite(float(lines["loader_speedup"])) and list(lines)[-2:] == ["batch_bytes_ratio", "loader_speedup"]


def test_scoring_benchmark_runs_tiny(tmp_path, tiny_gpt2):
    """benchmarks/scoring.py on a tiny model and 2,000 tokens: both ways agree (the script checks log-probs and
    keys), the log-probs within 1e-6, every figure present, the headline last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "scoring.py"), "--model", str(tiny_gpt2), "--tokens", "2000",
           "--window", "64", "--stride", "48"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    assert int(lines["positions"]) == 1999 and float(lines["max_abs_log_prob_difference"]) < 1e-6
    assert float(lines["two_pass_seconds"]) > 0 and float(lines["one_pass_seconds"]) > 0
    assert math.isfinite(float(lines["scoring_speedup"])) and list(lines)[-1] == "scoring_speedup"


def test_router_features_benchmark_runs_tiny(tmp_path, tiny_gpt2):
    """benchmarks/router_features.py on a tiny model and 2,000 tokens: both ways agree (the script checks gold
    log-probs and features), every figure present, the headline last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "router_features.py"), "--model", str(tiny_gpt2),
           "--tokens", "2000", "--window", "64", "--stride", "48"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    assert int(lines["positions"]) == 1999 and float(lines["max_abs_feature_difference"]) < 1e-3
    assert float(lines["full_width_seconds"]) > 0 and float(lines["one_pass_seconds"]) > 0
    assert math.isfinite(float(lines["router_scoring_speedup"])) and list(lines)[-1] == "router_scoring_speedup"


def test_cpu_allocator_benchmark_runs_tiny(tmp_path):
    """benchmarks/cpu_allocator.py with one child per setting and one timed step: both settings train to the same
    losses (the script checks), every figure present, the headline last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "cpu_allocator.py"), "--rounds", "1", "--steps", "1"]
    lines = run_benchmark(cmd, tmp_path)
    for name in ("score_seconds_thp_off", "train_seconds_thp_off", "score_seconds_thp_on", "train_seconds_thp_on"):
        assert float(lines[name]) > 0, name
    assert float(lines["peak_rss_mb_thp_off"]) > 100 and float(lines["peak_rss_mb_thp_on"]) > 100
    assert list(lines)[-2:] == ["score_speedup", "train_step_speedup"]


def test_lm_head_benchmark_runs_tiny(tmp_path):
    """benchmarks/lm_head.py on a small product: both layouts agree (the script checks), every figure present, the
    headline last."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "lm_head.py"), "--rows", "64", "--dim", "16", "--vocab", "1000",
           "--repeats", "2"]  # fmt: skip
    lines = run_benchmark(cmd, tmp_path)
    assert (int(lines["rows"]), int(lines["dim"]), int(lines["vocab"])) == (64, 16, 1000)
    assert float(lines["linear_seconds"]) > 0 and float(lines["transposed_seconds"]) > 0
    assert math.isfinite(float(lines["transposed_head_speedup"]))
    assert float(lines["linear_logsumexp_seconds"]) > 0 and float(lines["transposed_logsumexp_seconds"]) > 0
    assert list(lines)[-1] == "transposed_with_logsumexp_speedup"


def test_a_time_limit_whose_exception_was_lost_still_stops_the_next_stage(monkeypatch):
    """The signal can land where its exception is lost (a finalizer's exceptions are only printed; a library may
    catch everything): the run then went on to the end, with no time_limit line (a flaky CI failure)."""
    import signal
    import time

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    def swallowing():
        try:
            time.sleep(0.5)  # the alarm fires in here
        except BaseException:
            pass
        return "went on"

    try:
        gpu.start_time_limit(0.05)
        assert gpu.section("first", swallowing) == "went on"
        with pytest.raises(gpu.TimeLimitReached, match="time limit of 0.05 s was reached"):
            gpu.section("second", lambda: "must not start")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_folded_norms_keep_the_low_half_of_the_norms_in_fp16(monkeypatch):
    """gpu.py's folded-norms products in fp16, as on the device (the tiny CPU run multiplies in fp32, where the low
    half is 0): q'·k'ᵀ, summed exactly from the fp16 columns (as the GPU's fp32 accumulation nearly does), equals
    ‖k‖² − 2 q·k to about 2⁻²² of the largest norm; ‖k‖² in the high half alone is off by about 2⁻¹¹."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    g = torch.Generator().manual_seed(0)
    qc = torch.randn(17, 30, generator=g).half()
    keys = (torch.randn(400, 30, generator=g) * torch.rand(400, 1, generator=g) * 4).half()
    norms = keys.float().square().sum(1)
    q, k = gpu.folded_norms(qc, keys, norms)
    assert q.dtype == k.dtype == torch.float16 and q.shape == (17, 32) and k.shape == (400, 32)
    folded = q.double() @ k.double().T
    exact = norms.double() - 2 * qc.double() @ keys.double().T
    error = float((folded - exact).abs().max() / norms.max())
    assert error < 2**-19, error
    k[:, 31] = 0  # the low half dropped
    assert float(((q.double() @ k.double().T) - exact).abs().max() / norms.max()) > 2**-15


def test_a_skipped_stage_does_not_run_and_an_unknown_one_is_refused(monkeypatch, capsys):
    """A device rerun skips what the first run measured; a misspelled stage is named before any work."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    ran = []
    assert gpu.section("fit", lambda: ran.append("fit"), skipped=("fit",)) is None
    assert gpu.section("beam", lambda: ran.append("beam") or "done", skipped=("fit",)) == "done"
    assert ran == ["beam"]
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["fit_skipped"] == "--skip" and "fit_stage_s" not in lines and float(lines["beam_stage_s"]) >= 0
    with pytest.raises(ValueError, match=r"unknown stages \['fitt'\]"):
        gpu.main(workdir=REPO / "never-made", tiny=True, skip=("fitt",))
    assert not (REPO / "never-made").exists()


@pytest.mark.parametrize("design", ["two_stage_select", "threshold_select"])
@pytest.mark.parametrize("width, m", [(10_000, 50), (9_000, 1), (4_000, 300), (300, 300), (20_000, 1096)])
def test_selection_designs_equal_one_topk(monkeypatch, design, width, m):
    """benchmarks/selection_designs.py against topk: several column groups plus a tail (10,000 = 4 × 2,048 + 1,808),
    one group, m = the whole row; a tie in different groups; a row whose sampled threshold keeps too few (fallback)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import selection_designs

    torch.manual_seed(0)
    scores = torch.randn(5, width)
    scores[0, 123] = scores[0, width - 7] = -100.0
    scores[1, ::64] = 100.0  # every sampled column of row 1 is the row's worst: its threshold keeps everything
    scores[2, 1::64] = -50.0  # row 2: the smallest values all sit between the sampled columns
    scores[3, ::64] = -100.0 - torch.arange(len(scores[3, ::64]))  # row 3: the sample holds the smallest: it keeps
    # fewer than m columns, and the row falls back to a full topk
    values, cols = getattr(selection_designs, design)(scores, m)
    want = scores.topk(m, dim=1, largest=False).values
    torch.testing.assert_close(values.sort(1).values, want.sort(1).values, rtol=0, atol=0)
    torch.testing.assert_close(scores.gather(1, cols), values, rtol=0, atol=0)  # the columns hold those values
    assert all(len(set(row.tolist())) == m for row in cols)  # no column twice


def test_a_static_eager_divergence_is_located_and_scored(monkeypatch, capsys):
    """Where static and eager decoding first differ, and the eager mixture's preference there (near 0: a near-tie)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    seen = {}

    class Mixture:
        def log_probs(self, ids, mask):
            seen["ids"], seen["mask"] = ids, mask
            out = torch.zeros(1, ids.shape[1], 10)
            out[0, -1, 7], out[0, -1, 3] = -0.5, -0.75  # eager's token 7, static's 3
            return out

    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    free = torch.tensor([[0, 5, 6, 1, 2, 7, 9], [4, 5, 6, 1, 2, 8, 8]])
    fixed = free.clone()
    fixed[0, 5:] = torch.tensor([3, 3])  # row 0 differs from its third new token on
    gpu.divergence("x", Mixture(), fixed, free, 3, prompt_mask)
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(lines["x_static_tokens_agree_fraction"]) == pytest.approx(6 / 8)
    assert lines["x_first_divergence_step"] == "2" and float(lines["x_divergence_logprob_gap"]) == pytest.approx(0.25)
    assert torch.equal(seen["ids"], free[:1, :5]) and torch.equal(seen["mask"], torch.tensor([[0, 1, 1, 1, 1]]))


def test_the_cuvs_exact_rows_run_through_the_double(monkeypatch, capsys, tmp_path, biomed_datastore, cuvs):
    """gpu.py's rows for cuVS's brute force (only on a GPU with cuVS there), rehearsed on the CPU with the stand-in
    for its API: the targets and the searches run, and find the topk selection's neighbours."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    from lightning_memdec.retrieval.exact_search import exact_search
    from lightning_memdec.stages.settings import KNNTargets, TargetSearch
    from lightning_memdec.stages.targets import build_targets

    monkeypatch.setattr(gpu, "cuvs_usable", lambda: True)
    topk = build_targets(biomed_datastore, None, tmp_path / "targets", knn=KNNTargets(k=16, temperature=16.0),
                         search=TargetSearch(backend="exact", selection="topk"))  # fmt: skip
    gpu.section("targets_cuvs_exact", gpu.selection_targets_rate, "cuvs", biomed_datastore, biomed_datastore, topk,
                16, "cpu")  # fmt: skip
    keys = torch.from_numpy(np.array(gpu.Datastore(biomed_datastore).keys))
    search = partial(exact_search, keys[:1].float(), keys, 16)
    gpu.section("knn_search_cuvs_exact_at_3000", gpu.cuvs_exact_row, search, 3000)
    monkeypatch.setattr(gpu, "search_breakdown", lambda *args: None)  # the rows below, not the breakdowns
    monkeypatch.setattr(gpu, "threshold_breakdown", lambda *args: None)
    monkeypatch.setattr(gpu, "rows_breakdown", lambda *args: None)
    gpu.search_rates(biomed_datastore, biomed_datastore, 16, bound=1.0, n=256)
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    assert not [k for k in lines if k.endswith("_error")], lines
    assert float(lines["targets_exact_cuvs_queries_per_s"]) > 0
    assert int(lines["targets_cuvs_entries_differing_from_topk"]) == 0
    assert (
        int(lines["knn_search_cuvs_exact_equal_at_3000"]) == 1 and float(lines["knn_search_cuvs_exact_ms_at_3000"]) > 0
    )
    assert (
        float(lines["exact_search_cuvs_queries_per_s"]) > 0 and float(lines["exact_search_cuvs_rows_equal_topk"]) == 1
    )


def test_tiny_latency_settings_keep_what_the_command_line_gave(monkeypatch):
    """--tiny true --k 32: the tiny run at k 32 (it overrode every given setting with its own, k 64, in silence)."""
    import inspect

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import latency

    defaults = {name: p.default for name, p in inspect.signature(latency.main).parameters.items()}
    given = defaults | {"tiny": True, "k": 32}
    tiny = latency.tiny_settings(given)
    assert "k" not in tiny and tiny["sizes"] == latency.TINY["sizes"]
    assert given | tiny == defaults | latency.TINY | {"tiny": True, "k": 32}
