"""Runs beyond one machine, on one CPU machine: 2 "nodes" × 2 processes (torchrun, gloo), the shared-filesystem check,
and exact search with the keys sharded over ranks (docs/cluster.md)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_training_ddp import REPO, WEIGHT_ATOL, fit, fit_args, small_pair, weights  # noqa: F401 (a fixture)

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.shared_filesystem import check_shared_directory, marker
from lightning_memdec.retrieval.exact_search import exact_search
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.retrieval.sharded_search import check_shards_hold_k, key_shard, merge_shards, shard_search
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets

NODES, PER_NODE = 2, 2
STAGE_HARDWARE = [
    "--hardware.accelerator", "cpu", "--hardware.devices", str(PER_NODE), "--hardware.num_nodes", str(NODES),
    "--hardware.strategy", "ddp",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args_of_node, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`memdec <args>` as two torchrun launches of 2 processes each (node ranks 0 and 1, one rendezvous on
    127.0.0.1): the commands of docs/cluster.md's torchrun recipe, with ``args_of_node(node)`` each node's args."""
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", str(PER_NODE)]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmds = [[*launch, "--node_rank", str(node), "-m", "lightning_memdec", *args_of_node(node)] for node in range(NODES)]
    return run_all([(cmd, env) for cmd in cmds], timeout)


def srun_like(args: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`memdec <args>` as 4 processes with the environment `srun` gives the tasks of a 2-node job with
    ``--ntasks-per-node=2`` (no SLURM here: the variables Lightning's SLURMEnvironment reads, set by hand)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env |= {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "SLURM_NODELIST": "127.0.0.1"}
    env |= {"SLURM_JOB_NAME": "memdec", "SLURM_JOB_ID": "1", "SLURM_NNODES": str(NODES)}
    env |= {"SLURM_NTASKS": str(NODES * PER_NODE), "SLURM_NTASKS_PER_NODE": str(PER_NODE)}
    cmd = [sys.executable, "-m", "lightning_memdec", *args]
    tasks = [
        {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % PER_NODE), "SLURM_NODEID": str(rank // PER_NODE)}
        for rank in range(NODES * PER_NODE)
    ]
    return run_all([(cmd, env | task) for task in tasks], timeout)


def run_all(commands: list[tuple[list[str], dict]], timeout: int) -> list[subprocess.CompletedProcess]:
    """Start every (command, environment) at once, their output in files, not pipes (a rank blocked on a full pipe
    would hang the others in a collective), and wait for all of them."""
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{i}.out", "w+"), open(f"{logs}/{i}.err", "w+")) for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, stdout=o, stderr=e, env=env) for (cmd, env), (o, e) in zip(commands, files)]
        results = []
        for proc, (out, err) in zip(procs, files):
            proc.wait(timeout=timeout)
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read())
                f.close()
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, *texts))
        return results


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stderr[-4000:]}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_nodes_build_the_datastore_of_one_process(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore, launcher):
    out = tmp_path / "ds"
    args = ["build-datastore", "--corpus", str(biomed_corpus), "--model", str(tiny_gpt2), "--out", str(out)]
    args += ["--windows.window", "64", "--windows.stride", "32", "--windows.batch_size", "4", *STAGE_HARDWARE]
    assert_ok(two_nodes(lambda node: args) if launcher == "torchrun" else srun_like(args))
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == ["keys.npy", "meta.json", "values.npy"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("search", ["faiss", "exact-sharded"])
def test_two_nodes_build_the_targets_of_one_process(tmp_path, biomed_datastore, biomed_index, search):
    """FAISS over a replica per rank, and exact search over keys sharded 4 ways, against one unsharded process."""
    knn = KNNTargets(k=16, temperature=4.0)
    if search == "faiss":
        ref = build_targets(
            biomed_datastore, biomed_index, tmp_path / "ref", knn=knn, search=TargetSearch(chunk_size=512)
        )
        backend = ["--index", str(biomed_index)]
    else:
        ref = build_targets(
            biomed_datastore, None, tmp_path / "ref", knn=knn, search=TargetSearch("exact", chunk_size=512)
        )
        backend = ["--search.backend", "exact", "--search.shard_keys", "true"]
    out = tmp_path / "t"
    args = ["build-targets", "--datastore", str(biomed_datastore), *backend, "--out", str(out)]
    args += ["--knn.k", "16", "--knn.temperature", "4.0", "--search.chunk_size", "512", *STAGE_HARDWARE]
    assert_ok(two_nodes(lambda node: args))
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_nodes_train_the_weights_of_one_process(tmp_path, small_pair):  # noqa: F811 (the imported fixture)
    """4 ranks × batch 1 on 2 nodes against 1 process × batch 4: the same windows per step, so the same weights
    within the 1-vs-2-process tolerance of tests/test_training_ddp.py."""
    one = fit(small_pair, tmp_path / "one", devices=1)
    hardware = ["--config", str(REPO / "conf/hardware/ddp_cpu.yaml"), "--trainer.num_nodes", str(NODES)]
    args = ["fit", *hardware, *fit_args(small_pair, tmp_path / "four", batch_size=1)]
    assert_ok(two_nodes(lambda node: args))
    w1, w4 = weights(one), weights(tmp_path / "four")
    diff = max(float((w1[k] - w4[k]).abs().max()) for k in w1)
    print(f"max |Δw| 1 process vs 2 nodes × 2: {diff:.3g}")
    assert diff < WEIGHT_ATOL


@pytest.mark.multiprocess
@pytest.mark.slow
def test_nodes_that_do_not_share_the_output_are_refused_before_any_work(tmp_path, biomed_corpus, tiny_gpt2):
    """Each node's --out on its own directory (a node-local disk, simulated): every rank raises the clear error after
    the ranks connect, before a key is computed, and nothing is published."""
    outs = [tmp_path / f"node{node}" / "ds" for node in range(NODES)]
    args = ["build-datastore", "--corpus", str(biomed_corpus), "--model", str(tiny_gpt2)]
    args += ["--windows.window", "64", "--windows.stride", "32", *STAGE_HARDWARE]
    results = two_nodes(lambda node: [*args, "--out", str(outs[node])])
    for node, result in enumerate(results):
        assert result.returncode != 0, f"node {node} succeeded"
        assert "must be on a filesystem every node sees" in result.stderr, result.stderr[-4000:]
        assert "sees 2 of the 4 ranks' markers" in result.stderr
        assert not outs[node].exists() and not (partial_dir(outs[node]) / "keys.npy").exists()


class FakeStrategy:
    """Rank 0 of 2 whose barrier stands in for rank 1: it writes rank 1's marker when ``rank1_shares`` is true, and
    rank 1 votes ``rank1_sees_all`` in the all-reduce (Lightning's meaning of ``all``: every rank, else any)."""

    def __init__(self, directory: Path, rank1_shares: bool, rank1_sees_all: bool = True):
        self.world_size, self.global_rank, self.directory, self.rank1_shares = 2, 0, directory, rank1_shares
        self.rank1_sees_all = rank1_sees_all

    def barrier(self, name: str) -> None:
        if name == "shared-filesystem-written" and self.rank1_shares:
            marker(self.directory, 1).touch()

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return (decision and self.rank1_sees_all) if all else (decision or self.rank1_sees_all)


def test_shared_directory_check_needs_every_ranks_marker_not_a_stale_one(tmp_path):
    directory = tmp_path / "progress"
    check_shared_directory(FakeStrategy(directory, rank1_shares=True), directory, "--out", wait_s=0)
    assert not marker(directory, 0).exists(), "each rank removes its marker once all have checked"
    directory.mkdir(exist_ok=True)
    marker(directory, 1).touch()  # left by an earlier run: must not count as rank 1
    with pytest.raises(ArtifactError, match=r"rank 0 sees 1 of the 2 ranks.*--out\) must be on a filesystem every"):
        check_shared_directory(FakeStrategy(directory, rank1_shares=False), directory, "--out", wait_s=0)
    blind = FakeStrategy(directory, rank1_shares=True, rank1_sees_all=False)  # rank 0 sees both, rank 1 does not
    with pytest.raises(ArtifactError, match=r"rank 0 sees 2 of the 2 ranks.* \(some rank saw fewer\)"):
        check_shared_directory(blind, directory, "--out", wait_s=0)
    single = SimpleNamespace(world_size=1)
    check_shared_directory(single, tmp_path / "never", "--out")  # one process: nothing to check, nothing written
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def keys() -> torch.Tensor:
    """Keys with exact duplicates (ties), in fp16 like a datastore's."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 24, generator=g).half()
    return torch.cat([base, base[:50]])  # rows 700..749 repeat rows 0..49: tied distances across shards


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("self_exclude", [False, True])
def test_sharded_search_equals_unsharded_search(keys, world_size, self_exclude):
    """Each rank's exact top-k of its N/R keys, gathered and merged, against one search over all keys: the same
    ids (ties broken by id in both) and the same fp32 distances."""
    rows = torch.arange(0, 750, 7)
    queries = keys[rows].float() + 0.01 * torch.randn(
        len(rows), keys.shape[1], generator=torch.Generator().manual_seed(1)
    )
    own = rows if self_exclude else None
    k = 40
    want_d, want_i = exact_search(queries, keys, k, own)
    shards = [key_shard(len(keys), r, world_size) for r in range(world_size)]
    assert shards[0][0] == 0 and shards[-1][1] == len(keys)
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    found = [shard_search(queries, keys[lo:hi], lo, k, own) for lo, hi in shards]
    got_d, got_i = merge_shards(torch.stack([d for d, _ in found]), torch.stack([i for _, i in found]), k)
    torch.testing.assert_close(got_i, want_i, rtol=0, atol=0)
    torch.testing.assert_close(got_d, want_d, rtol=0, atol=0)
    if self_exclude:
        assert not (got_i == rows[:, None]).any()


def test_shards_must_hold_k_candidates_checked_before_any_search(biomed_datastore, biomed_index, tmp_path):
    check_shards_hold_k(100, 4, 24, self_exclude=True)  # 25 per shard: k + own key
    with pytest.raises(ValueError, match="4 ranks leave 24 keys of 99 on the smallest shard"):
        check_shards_hold_k(99, 4, 24, self_exclude=True)
    n = int(np.load(biomed_datastore / "values.npy", mmap_mode="r").shape[0])
    with pytest.raises(ValueError, match="smallest shard, fewer than"):
        build_targets(
            biomed_datastore,
            out=tmp_path / "t",
            search=TargetSearch(backend="exact", shard_keys=True),
            hardware=Hardware(devices=4),
            knn=KNNTargets(k=n // 4),
        )
    with pytest.raises(ValueError, match="shard_keys needs the exact backend"):
        build_targets(
            biomed_datastore,
            out=tmp_path / "t",
            index=biomed_index,
            search=TargetSearch(backend="faiss", shard_keys=True),
        )
    assert not (tmp_path / "t").exists() and not partial_dir(tmp_path / "t").exists()


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ4"])
def test_sharded_index_build_equals_the_one_process_build(tmp_path, biomed_datastore, factory):
    """Shards of 700 keys (5 chunks, the last one short) added to copies of one trained index and merged in key
    order: the index file of `build-index` with the same sample and seed, byte for byte, and the same meta.json."""
    from lightning_memdec.io.artifact_dirs import read_meta
    from lightning_memdec.io.readers import INDEX
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.index_shards import build_index_sharded

    settings = dict(plan=IndexSettings(factory=factory, train_size=800), recall_queries=64, recall_k=8)
    one = build_index(biomed_datastore, tmp_path / "one", **settings)
    sharded = build_index_sharded(biomed_datastore, tmp_path / "sharded", chunk_keys=700, **settings)
    assert (sharded / INDEX).read_bytes() == (one / INDEX).read_bytes()
    assert read_meta(sharded) == read_meta(one)
    assert sorted(p.name for p in sharded.iterdir()) == [INDEX, "meta.json"]


def test_a_sharded_build_stopped_before_publishing_resumes_only_with_its_nprobe_and_recall(
    tmp_path, biomed_datastore, monkeypatch
):
    """nprobe and the recall measurement are recorded in meta.json (nprobe applied on load): a resume with another
    is refused, naming it (the shards are kept for a rerun with the recorded ones), instead of publishing an index
    with the stopped run's. Without a recall measured, its k changes nothing and is not compared."""
    import lightning_memdec.stages.index_shards as index_shards
    from lightning_memdec.io.artifact_dirs import read_meta
    from lightning_memdec.io.readers import Datastore
    from lightning_memdec.retrieval.faiss_index import index_run_settings

    def stopped(*args):
        raise KeyboardInterrupt

    ivf = IndexSettings(factory="IVF16,Flat")
    out, settings = tmp_path / "sharded", dict(recall_queries=16, recall_k=8, chunk_keys=1000)
    with monkeypatch.context() as patch:
        patch.setattr(index_shards, "publish", stopped)
        with pytest.raises(KeyboardInterrupt):
            index_shards.build_index_sharded(biomed_datastore, out, plan=ivf, **settings)
    with pytest.raises(ArtifactError, match=re.escape("different settings (nprobe: 32 there, 4 here)")):
        index_shards.build_index_sharded(biomed_datastore, out, plan=IndexSettings(factory="IVF16,Flat", nprobe=4),
                                         **settings)  # fmt: skip
    with pytest.raises(ArtifactError, match=re.escape("different settings (recall: [16, 8] there, [16, 64] here)")):
        index_shards.build_index_sharded(biomed_datastore, out, plan=ivf, **settings | {"recall_k": 64})
    assert partial_dir(out).is_dir()
    index_shards.build_index_sharded(biomed_datastore, out, plan=ivf, **settings)
    assert read_meta(out)["nprobe"] == 32 and read_meta(out)["recall"]["k"] == 8
    store = Datastore(biomed_datastore)
    assert index_run_settings(store, "faiss", "Flat", 0, 0, 32, (0, 8)) == index_run_settings(
        store, "faiss", "Flat", 0, 0, 32, (0, 64)
    )


def test_the_sharded_build_prints_its_plan_and_recall_and_plans_only_when_asked(tmp_path, biomed_datastore, capsys):
    """docs/scaling.md has users look at the plan before a large build: the sharded command printed none and had no
    --plan_only, and its recall was only in meta.json."""
    from lightning_memdec.io.artifact_dirs import read_meta
    from lightning_memdec.retrieval.index_plan import IndexPlan
    from lightning_memdec.stages.index_shards import build_index_sharded

    settings = dict(plan=IndexSettings(factory="IVF8,Flat", train_size=800), recall_queries=64, recall_k=8)
    plan = build_index_sharded(biomed_datastore, tmp_path / "planned", plan_only=True, **settings)
    assert isinstance(plan, IndexPlan) and not (tmp_path / "planned").exists()
    assert plan.describe() in capsys.readouterr().out
    out = build_index_sharded(biomed_datastore, tmp_path / "built", chunk_keys=1000, **settings)
    recall = read_meta(out)["recall"]
    assert f"recall@8 against exact search on 64 stored keys: {recall['recall']:.4f}" in capsys.readouterr().out


def test_other_ranks_leave_the_work_directory_to_rank_0(tmp_path, monkeypatch):
    """torchrun/srun start all ranks at once: a rank other than 0 that finds rank 0's .partial directory before its
    run config is written must neither refuse it as "other settings" nor create, clear or record anything."""
    from lightning_memdec.io.artifact_dirs import start_work_dir

    out = tmp_path / "ds"
    partial_dir(out).mkdir()  # rank 0 has created it, not yet written its run config
    monkeypatch.setenv("RANK", "2")
    assert start_work_dir(out, {"a": 1}, overwrite=True) == partial_dir(out)
    assert start_work_dir(tmp_path / "other", {"a": 1}, overwrite=False) == partial_dir(tmp_path / "other")
    assert list(partial_dir(out).iterdir()) == [] and not partial_dir(tmp_path / "other").exists()
    out.mkdir()
    with pytest.raises(ArtifactError, match="rank 0 says whether it is this run's"):
        start_work_dir(out, {"a": 1}, overwrite=False)  # an output in place: rank 0 refuses it (or it just published)
    out.rmdir()
    monkeypatch.setenv("RANK", "0")  # rank 0 still refuses a work directory it cannot match to these settings
    with pytest.raises(ArtifactError, match="unfinished run with different settings"):
        start_work_dir(out, {"a": 1}, overwrite=False)
