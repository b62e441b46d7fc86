"""Resume after a kill, and atomic checkpoints.

- A tiny stage-2 run (blip2_opt_pformer + frozen P-Former teacher, 3 epochs) killed with SIGKILL in the
  middle of epoch 1 and resumed from its checkpoint_last.pth (``run.resume_ckpt_path``) ends with the same
  parameters and optimizer state, bit for bit, as an uninterrupted run with the same seed; without the
  RNG sidecar (checkpoint_N.rng.pth) it still resumes, but not bit-exactly.
- A failure while a checkpoint is written (in-process RunnerPFormer, torch.save writing half a file then
  raising) leaves no truncated file under a final name and keeps the previous checkpoints.
- Clear errors for a missing or truncated resume checkpoint.
See docs/reliability.md.
"""
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import REPO, build_runner, make_teacher, only_run_dir, run_script, stage0_config, stage2_config

EPOCHS = 3
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    return make_teacher(tiny, tmp_path_factory.mktemp("teacher") / "pformer.pth")


def stage2_run_config(tiny, teacher, output_dir):
    """32 iterations of 2 samples per epoch: room to kill the run mid-epoch."""
    return stage2_config(tiny, teacher, output_dir, max_epoch=EPOCHS, batch_size_train=2, warmup_steps=4)


def launch(cfg, workdir, name, options=(), script="train.py"):
    """``script`` (train.py) in the background; stdout/stderr go to workdir/<name>.out / .err."""
    cfg_path = os.path.join(workdir, f"{name}.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, os.path.join(REPO, script), "--cfg-path", cfg_path]
    if options:
        cmd += ["--options", *options]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out, err = (open(os.path.join(workdir, f"{name}.{ext}"), "w") for ext in ("out", "err"))
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=err)
    proc.log = err.name
    return proc


def finish(proc, timeout=300):
    proc.wait(timeout=timeout)
    log = open(proc.log).read()
    assert proc.returncode == 0, log[-6000:]
    return log


def kill_when(proc, ready, timeout=300, poll=0.02):
    """SIGKILL the run as soon as ``ready()`` is true (checked every ``poll`` seconds); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{open(proc.log).read()[-4000:]}")
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(poll)
    proc.kill()
    pytest.fail("the run did not reach the kill point in time")


def kill_mid_epoch(proc, output_dir, epoch=1, after_iters=2, timeout=300):
    """SIGKILL once checkpoint_<epoch-1>.pth exists and iteration ``after_iters`` of ``epoch`` has logged."""
    pattern = re.compile(rf"epoch {epoch} iter (\d+)/")

    def ready():
        logged = [int(i) for i in pattern.findall(open(proc.log).read())]
        return bool(glob.glob(os.path.join(output_dir, "*", f"checkpoint_{epoch - 1}.pth")) and logged
                    and max(logged) >= after_iters)

    kill_when(proc, ready, timeout)


def train_stats(run_dir):
    """The per-epoch train stats lines of log.txt (the first entry is the config)."""
    lines = open(os.path.join(run_dir, "log.txt")).read().split("\n}\n", 1)[1].splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def scratch_files(run_dir):
    """What an interrupted save left in the runner's scratch folder."""
    scratch = os.path.join(run_dir, ".saving")
    return os.listdir(scratch) if os.path.isdir(scratch) else []


def weights(checkpoint):
    """The tensors of a checkpoint's model, without the stage record (``_extra_state``, a dict)."""
    return {k: v for k, v in checkpoint["model"].items() if k != "_extra_state"}


def max_param_difference(a, b):
    return max(float((weights(a)[k] - weights(b)[k]).abs().max()) for k in weights(a))


@pytest.fixture(scope="module")
def runs(tiny, teacher, tmp_path_factory):
    """Uninterrupted run A, run B killed in epoch 1, B resumed with (C) and without (D) its RNG sidecar."""
    work = str(tmp_path_factory.mktemp("resume"))
    cfg = lambda out: stage2_run_config(tiny, teacher, out)  # noqa: E731
    run_a = launch(cfg("out_a"), work, "a")
    run_b = launch(cfg("out_b"), work, "b")  # in parallel with A: one thread each
    kill_mid_epoch(run_b, os.path.join(work, "out_b"))
    b_dir = only_run_dir(os.path.join(work, "out_b"))
    # D resumes from a copy of B's checkpoint without checkpoint_0.rng.pth (e.g. a LAVIS-runner checkpoint).
    no_rng = os.path.join(work, "no_rng")
    os.makedirs(no_rng)
    shutil.copy(os.path.join(b_dir, "checkpoint_0.pth"), no_rng)
    # through the latest link, relative to the working directory, as a user would name it
    run_c = launch(cfg("out_c"), work, "c", ["run.resume_ckpt_path=out_b/latest/checkpoint_last.pth"])
    log_a = finish(run_a)
    run_d = launch(cfg("out_d"), work, "d", [f"run.resume_ckpt_path={no_rng}/checkpoint_0.pth"])
    log_c, log_d = finish(run_c), finish(run_d)
    dirs = {k: only_run_dir(os.path.join(work, f"out_{k}")) for k in "acd"}
    dirs["b"] = b_dir
    return {"dirs": dirs, "logs": {"a": log_a, "b": open(run_b.log).read(), "c": log_c, "d": log_d}}


def test_killed_run_left_a_complete_epoch_0_checkpoint(runs):
    b = runs["dirs"]["b"]
    assert "epoch 1 iter 2/" in runs["logs"]["b"]
    assert not os.path.exists(os.path.join(b, "checkpoint_1.pth"))
    assert os.path.samefile(os.path.join(b, "checkpoint_last.pth"), os.path.join(b, "checkpoint_0.pth"))
    assert load(os.path.join(b, "checkpoint_last.pth"))["epoch"] == 0
    assert load(os.path.join(b, "checkpoint_0.rng.pth"))["epoch"] == 0
    assert not scratch_files(b)


def test_resume_continues_at_the_next_epoch_with_teacher_optimizer_and_lr(runs):
    log = runs["logs"]["c"]
    b = os.path.realpath(runs["dirs"]["b"])
    assert f"Resuming at epoch 1 from {b}/checkpoint_last.pth" in log and "RNG states restored" in log
    assert "Start training epoch 0" not in log and "Start training epoch 1" in log
    assert re.search(r"P-Former teacher \S+pformer\.pth: Q=4", log)  # rebuilt strictly from pformer_checkpoint
    c, a = runs["dirs"]["c"], runs["dirs"]["a"]
    assert not os.path.exists(os.path.join(c, "checkpoint_0.pth"))
    # epochs 1 and 2: the same logged losses, loss terms and lr as the uninterrupted run
    assert train_stats(c) == train_stats(a)[1:]
    ckpt = load(os.path.join(c, "checkpoint_last.pth"))
    assert ckpt["epoch"] == EPOCHS - 1
    assert not [k for k in ckpt["model"] if k.startswith(("pformer_teacher.", "opt_model.", "visual_encoder."))]


def test_resumed_run_is_bit_exact(runs):
    a = load(os.path.join(runs["dirs"]["a"], "checkpoint_last.pth"))
    c = load(os.path.join(runs["dirs"]["c"], "checkpoint_last.pth"))
    assert a["model"].keys() == c["model"].keys() and a["model"]["_extra_state"] == c["model"]["_extra_state"]
    for key in weights(a):
        assert torch.equal(a["model"][key], c["model"][key]), key
    for (ka, sa), (kc, sc) in zip(a["optimizer"]["state"].items(), c["optimizer"]["state"].items()):
        assert ka == kc and all(torch.equal(sa[n], sc[n]) for n in sa), ka
    assert a["optimizer"]["param_groups"] == c["optimizer"]["param_groups"]


def test_resume_without_rng_sidecar_works_but_is_not_bit_exact(runs):
    log = runs["logs"]["d"]
    assert "RNG states not restored" in log and "checkpoint_0.rng.pth does not exist" in log
    a = load(os.path.join(runs["dirs"]["a"], "checkpoint_last.pth"))
    d = load(os.path.join(runs["dirs"]["d"], "checkpoint_last.pth"))
    difference = max_param_difference(a, d)
    print(f"resume without RNG states: max |parameter difference| after {EPOCHS} epochs = {difference:.3g}")
    assert difference > 0


def test_resume_on_two_gloo_ranks_is_bit_exact(tiny, teacher, tmp_path):
    """torchrun, 2 ranks: per-rank RNG states (gathered into the sidecar) and the DistributedSampler epoch
    (LAVIS's IterLoader would restart it at 0) are restored; resuming from epoch 0 reproduces epoch 1."""
    cfg = stage2_config(tiny, teacher, "out", max_epoch=2, batch_size_train=4, warmup_steps=4)
    run_script("train.py", cfg, str(tmp_path), nproc=2)
    a = only_run_dir(tmp_path / "out")
    rng = load(os.path.join(a, "checkpoint_0.rng.pth"))
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    cfg["run"]["output_dir"] = "resumed"
    proc = run_script("train.py", cfg, str(tmp_path), nproc=2, options=[f"run.resume_ckpt_path={a}/checkpoint_0.pth"])
    assert "RNG states restored" in proc.stderr
    c = only_run_dir(tmp_path / "resumed")
    ckpt_a, ckpt_c = (load(os.path.join(d, "checkpoint_1.pth")) for d in (a, c))
    for key in weights(ckpt_a):
        assert torch.equal(ckpt_a["model"][key], ckpt_c["model"][key]), key
    assert train_stats(c) == train_stats(a)[1:]


# ---------------------------------------------------------------------------------------------------------
# In-process runner: atomic saves and resume errors.


@pytest.fixture
def runner(tiny, tmp_path, monkeypatch):
    return build_runner(stage0_config(tiny, "out"), tmp_path, monkeypatch)


class DiskFull(OSError):
    pass


def half_write_then_fail(real_save, fail_on_call):
    """A torch.save that works until call number ``fail_on_call``, which writes half the bytes and raises."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)
        data = open(f, "rb").read()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
        raise DiskFull(28, "No space left on device")

    return save


def _files(run_dir):
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in os.listdir(run_dir) if name.endswith(".pth")}


@pytest.mark.parametrize("fail_on_call", [1, 2], ids=["checkpoint", "rng_sidecar"])
def test_failed_save_keeps_previous_checkpoints_and_leaves_no_partial_file(runner, monkeypatch, fail_on_call):
    run_dir = str(runner.output_dir)
    runner._save_checkpoint(0)
    before = _files(run_dir)
    assert {"checkpoint_0.pth", "checkpoint_0.rng.pth", "checkpoint_last.pth", "pformer.pth"} <= set(before)
    real_save = torch.save
    for epoch in (1, 0):  # a new epoch, then overwriting an existing name
        monkeypatch.setattr(torch, "save", half_write_then_fail(real_save, fail_on_call))
        with pytest.raises(DiskFull):
            runner._save_checkpoint(epoch)
        monkeypatch.setattr(torch, "save", real_save)
        assert _files(run_dir) == before  # nothing new, nothing changed, nothing truncated
        assert not scratch_files(run_dir)
    assert load(os.path.join(run_dir, "checkpoint_last.pth"))["epoch"] == 0
    runner._save_checkpoint(1)  # the next save works
    assert load(os.path.join(run_dir, "checkpoint_last.pth"))["epoch"] == 1


def test_resume_checkpoint_missing_or_truncated_is_a_clear_error(runner, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run\.resume_ckpt_path: no file at .*nope\.pth.*checkpoint_last\.pth"):
        runner._load_checkpoint(str(tmp_path / "nope.pth"))
    runner._save_checkpoint(0)
    data = open(os.path.join(runner.output_dir, "checkpoint_0.pth"), "rb").read()
    truncated = tmp_path / "checkpoint_0.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=r"run\.resume_ckpt_path: .*checkpoint_0\.pth is truncated"):
        runner._load_checkpoint(str(truncated))


def test_resume_from_another_model_is_a_clear_error(tiny, runner, tmp_path):
    torch.save({"model": {"Qformer.x": torch.zeros(1)}, "optimizer": {}, "epoch": 0}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match=r"cannot resume from .*other\.pth .*checkpoint does not match PFormerOPT"):
        runner._load_checkpoint(str(tmp_path / "other.pth"))


def test_rng_sidecar_of_another_world_size_is_ignored_with_a_warning(runner, caplog):
    runner._save_checkpoint(0)
    rng_path = os.path.join(runner.output_dir, "checkpoint_0.rng.pth")
    saved = load(rng_path)
    saved["ranks"] = saved["ranks"] * 2
    torch.save(saved, rng_path)
    with caplog.at_level(logging.WARNING):  # (another test may have raised the root logger's level)
        runner._load_checkpoint(os.path.join(runner.output_dir, "checkpoint_last.pth"))
    assert runner.start_epoch == 1 and runner._resume_rng is None
    assert "written by 2 ranks, this run has 1" in caplog.text
