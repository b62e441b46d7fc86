"""runner_iter_pformer: LAVIS's iteration-based schedule with the CPU / gloo fixes, resumed inside a data epoch.

- ResumableIterLoader: after ``seek(k)`` it gives exactly the batches an uninterrupted loader gives after k batches,
  across data-epoch boundaries, for each of 2 ranks, with and without worker processes; it reshuffles every data
  epoch on one process too, and pauses at an epoch change only with worker processes.
- A tiny stage-2 run (max_iters 48, inner epochs of 8 iterations, 32 batches per data epoch) killed with SIGKILL in
  the middle of data epoch 0, once its checkpoint at iteration 16 exists, and resumed from checkpoint_last.pth: the
  same logged losses for every later inner epoch, through the data-epoch change at iteration 32, and the same
  final weights and optimizer state, bit for bit, as the uninterrupted run.
- 2 gloo ranks under torchrun: a run resumed from its iteration-8 checkpoint ends as the uninterrupted run.
"""
import glob
import re
import os
import types

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lavis_pformer.runtime as runtime
from lavis_pformer.errors import ConfigError
from lavis_pformer.runner_iter import ResumableIterLoader, ResumableSampler, RunnerIterPFormer

from helpers import make_teacher, only_run_dir, run_script, stage0_config, stage2_config
from test_resume import finish, kill_when, launch, load, train_stats, weights

MAX_ITERS, PER_INNER = 48, 8


def loader(rank, workers=0, n=23, batch=3):
    dataset = list(range(n))
    sampler = ResumableSampler(dataset, num_replicas=2, rank=rank, seed=5)
    return ResumableIterLoader(DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                          num_workers=workers, generator=torch.Generator()))


@pytest.fixture
def sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.time, "sleep", calls.append)  # the pause of NoPauseIterLoader
    return calls


@pytest.mark.parametrize("rank", [0, 1])
def test_seek_continues_exactly_where_an_uninterrupted_loader_is(rank, sleeps):
    reference = loader(rank)
    per_epoch = len(reference)
    assert per_epoch == 12 // 3  # 23 samples, 2 ranks -> 12 each (padded), batches of 3
    batches = [next(reference).tolist() for _ in range(3 * per_epoch + 2)]
    assert all(len(set(sum(batches[e * per_epoch:(e + 1) * per_epoch], []))) == 12 for e in range(3))
    assert batches[:per_epoch] != batches[per_epoch:2 * per_epoch]  # reshuffled every epoch
    assert not sleeps  # no worker processes: no pause at the epoch changes
    for k in range(len(batches)):
        resumed = loader(rank)
        resumed.seek(k)
        assert (resumed.epoch, resumed.batches_in_epoch) == divmod(k, per_epoch)
        assert [next(resumed).tolist() for _ in range(len(batches) - k)] == batches[k:], k


def test_seek_with_worker_processes(sleeps):
    reference = loader(1, workers=2)
    batches = [next(reference).tolist() for _ in range(7)]
    assert sleeps == [2]  # LAVIS's pause at the epoch change, with workers
    resumed = loader(1, workers=2)
    resumed.seek(3)  # the last batch of epoch 0, then epoch 1
    assert [next(resumed).tolist() for _ in range(4)] == batches[3:]


def test_iteration_settings_are_checked():
    for run in ({"iters_per_inner_epoch": 8}, {"max_iters": 0, "iters_per_inner_epoch": 8},
                {"max_iters": 16, "iters_per_inner_epoch": "8"}):
        cfg = types.SimpleNamespace(run_cfg=OmegaConf.create(run))
        with pytest.raises(ConfigError, match="must be a positive integer for runner_iter_pformer"):
            RunnerIterPFormer(cfg, None, None, None, "job")


# ---------------------------------------------------------------------------------------------------------
# kill -9 inside a data epoch, resume from checkpoint_last.pth


def iter_config(cfg, **run):
    cfg["run"].pop("max_epoch")
    cfg["run"].update(runner="runner_iter_pformer", max_iters=MAX_ITERS, iters_per_inner_epoch=PER_INNER, **run)
    return cfg


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    return make_teacher(tiny, tmp_path_factory.mktemp("teacher") / "pformer.pth")


def kill_after_checkpoint(proc, output_dir, iters, timeout=300):
    """SIGKILL as soon as checkpoint_<iters>.pth exists (the run is then a few iterations into the next inner
    epoch, inside data epoch 0)."""
    kill_when(proc, lambda: glob.glob(os.path.join(output_dir, "*", f"checkpoint_{iters}.pth")), timeout, poll=0.005)


@pytest.fixture(scope="module")
def runs(tiny, teacher, tmp_path_factory):
    """A uninterrupted; B killed in inner epoch 2 (data epoch 0, batch ~20 of 32); C resumed from B."""
    work = str(tmp_path_factory.mktemp("resume_iters"))
    cfg = lambda out: iter_config(stage2_config(tiny, teacher, out, batch_size_train=2, warmup_steps=4))  # noqa: E731
    run_a, run_b = launch(cfg("out_a"), work, "a"), launch(cfg("out_b"), work, "b")
    kill_after_checkpoint(run_b, os.path.join(work, "out_b"), 16)
    b_dir = only_run_dir(os.path.join(work, "out_b"))
    run_c = launch(cfg("out_c"), work, "c", ["run.resume_ckpt_path=out_b/latest/checkpoint_last.pth"])
    logs = {"a": finish(run_a), "c": finish(run_c), "b": open(run_b.log).read()}
    dirs = {"a": only_run_dir(os.path.join(work, "out_a")), "b": b_dir, "c": only_run_dir(os.path.join(work, "out_c"))}
    return {"dirs": dirs, "logs": logs}


def resumed_at(runs):
    return load(os.path.join(runs["dirs"]["b"], "checkpoint_last.pth"))["iters"]


def test_killed_run_left_a_checkpoint_inside_data_epoch_0(runs):
    b, k = runs["dirs"]["b"], resumed_at(runs)
    assert k in (16, 24) and "Saving checkpoint at iteration 48" not in runs["logs"]["b"]  # 32 batches per epoch
    assert os.path.samefile(os.path.join(b, "checkpoint_last.pth"), os.path.join(b, f"checkpoint_{k}.pth"))
    checkpoint = load(os.path.join(b, "checkpoint_last.pth"))
    assert checkpoint["data"] == {"epoch": 0, "batches_in_epoch": k, "batches_per_epoch": 32, "world_size": 1}
    assert not [n for n in checkpoint["model"] if n.startswith(("visual_encoder.", "opt_model.", "pformer_teacher."))]


def test_resumed_run_continues_inside_the_data_epoch_with_the_same_losses(runs):
    log, k = runs["logs"]["c"], resumed_at(runs)
    assert f"Resuming at iteration {k}" in log and "RNG states restored" in log
    assert f"resume: data epoch 0, batch {k} of 32" in log
    a, c = train_stats(runs["dirs"]["a"]), train_stats(runs["dirs"]["c"])
    assert len(a) == MAX_ITERS // PER_INNER and c == a[k // PER_INNER:]  # the later inner epochs, past data epoch 0
    written = sorted(int(m.group(1)) for n in os.listdir(runs["dirs"]["c"])
                     for m in [re.fullmatch(r"checkpoint_(\d+)\.pth", n)] if m)
    assert written == list(range(k + PER_INNER, MAX_ITERS + 1, PER_INNER))


def test_resumed_run_is_bit_exact(runs):
    a = load(os.path.join(runs["dirs"]["a"], "checkpoint_last.pth"))
    c = load(os.path.join(runs["dirs"]["c"], "checkpoint_last.pth"))
    assert a["iters"] == c["iters"] == MAX_ITERS and a["data"] == c["data"]
    for key in weights(a):
        assert torch.equal(a["model"][key], c["model"][key]), key
    for (ka, sa), (kc, sc) in zip(a["optimizer"]["state"].items(), c["optimizer"]["state"].items()):
        assert ka == kc and all(torch.equal(sa[n], sc[n]) for n in sa), ka
    assert a["optimizer"]["param_groups"] == c["optimizer"]["param_groups"]


def test_two_gloo_ranks_resume_inside_a_data_epoch(tiny, tmp_path):
    """Stage 0 on 2 ranks (512 sentences, batch 16 per rank: 16 batches per data epoch), 24 iterations in inner
    epochs of 8; resumed from iteration 8 it ends as the uninterrupted run."""
    cfg = stage0_config(tiny, "full", batch_size_train=16)
    cfg["run"].pop("max_epoch")
    cfg["run"].update(runner="runner_iter_pformer", max_iters=24, iters_per_inner_epoch=8)
    run_script("train.py", cfg, str(tmp_path), nproc=2)
    a = only_run_dir(tmp_path / "full")
    assert len(load(os.path.join(a, "checkpoint_8.rng.pth"))["ranks"]) == 2
    cfg["run"]["output_dir"] = "resumed"
    proc = run_script("train.py", cfg, str(tmp_path), nproc=2, options=[f"run.resume_ckpt_path={a}/checkpoint_8.pth"])
    assert "RNG states restored" in proc.stderr and "resume: data epoch 0, batch 8 of 16" in proc.stderr
    c = only_run_dir(tmp_path / "resumed")
    assert train_stats(c) == train_stats(a)[1:]
    ca, cc = load(os.path.join(a, "checkpoint_24.pth")), load(os.path.join(c, "checkpoint_24.pth"))
    for key in weights(ca):
        assert torch.equal(ca["model"][key], cc["model"][key]), key
