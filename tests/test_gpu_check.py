"""bench/gpu_check.py, the GPU check, run on the CPU with --dry-run (tiny sizes, gloo, fp32, one repeat): every part
ends "ok" and writes what docs/cluster.md says it writes, so that the script is known to work before a GPU sees it.
What only a GPU runs (nccl, CUDA autocast and GradScaler, the paper sizes) is not covered here. Also: a part past its
time limit is ended with its child processes and recorded, and the next part runs."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, import_script

PARTS = ["env", "chain", "steps", "bench"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.load(open(out / "gpu_check.json"))


def test_every_part_runs_and_the_total_time_is_printed(dry_run):
    out, stdout, summary = dry_run
    assert summary["dry_run"] is True and list(summary["parts"]) == PARTS
    for name, entry in summary["parts"].items():
        assert entry["status"] == "ok", (name, entry.get("log_tail"))
        assert json.load(open(out / f"{name}.json")) == entry["result"] and (out / f"{name}.log").is_file()
    assert "[gpu-check] total " in stdout
    md = (out / "gpu_check.md").read_text()
    for title in ("1. Environment: ok", "2. Tiny chain through torchrun: ok", "3. Paper-size training steps: ok",
                  "4. Inference and VQ benchmarks: ok"):
        assert f"## {title}" in md


def test_environment_part(dry_run):
    env = dry_run[2]["parts"]["env"]["result"]
    assert env["torch"] and env["cuda_available"] is False and env["nccl"] is None and "error" not in env


def test_tiny_chain_part_ran_every_stage_both_evaluations_and_the_resume(dry_run):
    out, _, summary = dry_run
    chain = summary["parts"]["chain"]["result"]
    assert chain["backend"] == "gloo" and chain["failed"] == 0 and chain["missing_runs"] == 0
    runs = {r["name"]: r for r in chain["runs"]}
    for llm in ("opt", "t5"):
        for stage in (0, 1, 2):
            assert "--nproc_per_node=1" in runs[f"{llm} stage {stage}"]["command"]
            assert "train_loss" in runs[f"{llm} stage {stage}"]["final_losses"]
        assert "train_loss_align" in runs[f"{llm} stage 2"]["final_losses"]
        assert runs[f"{llm} stage 2"]["teacher_precision"] == "fp32"  # the default on the CPU
        assert "agg_metrics" in runs[f"{llm} vqa evaluation"]["metrics"]
        assert "CIDEr" in runs[f"{llm} caption evaluation"]["metrics"]["test"]
        resumed = runs[f"{llm} stage 2 resumed from epoch 0"]
        assert resumed["rng_sidecar_cuda_state"] is False and "train_loss_align" in resumed["final_losses"]
    assert runs["opt stage 2 resumed from epoch 0"]["same_epoch1_losses"] is True  # bit-exact on the CPU (OPT)
    for record in chain["runs"]:
        assert (out / record["log"]).is_file()


def test_training_steps_part_compares_each_stage_and_precision(dry_run):
    steps = dry_run[2]["parts"]["steps"]["result"]
    assert steps["complete"] is True
    assert [(r["stage"], r["precision"]) for r in steps["rows"]] == [
        (stage, precision) for stage in ("stage 1", "stage 2", "stage 2 (Flan-T5)") for precision in ("fp16", "bf16")]
    for r in steps["rows"]:
        assert r["time_ratio"] > 0 and r["step_peak_ratio"] > 0 and min(r["samples_per_s"].values()) > 0
        assert r["nonfinite_losses"] == {"ours": 0, "stock": 0}
        assert (r["grad_scale"]["ours"] is not None) == (r["precision"] == "fp16")
    first = {r["stage"]: r for r in steps["rows"] if r["precision"] == "fp16"}
    for r in first.values():
        teacher = r["teacher_precisions"]
        assert set(teacher) == {"fp32", "bf16"}
        assert 0.49 < teacher["bf16"]["teacher_bytes"] / teacher["fp32"]["teacher_bytes"] < 0.52  # + int64 buffers
        assert teacher["fp32"]["loss_align_rel_change"] == 0 and 0 < teacher["bf16"]["loss_align_rel_change"] < 0.01
        assert 0 < teacher["bf16"]["grad_rel_change"] < 0.05
    assert "prioritize" in first["stage 2 (Flan-T5)"]["stock_note"]  # LAVIS's Blip2T5 under fp16 autocast


def test_benchmarks_part(dry_run):
    bench = dry_run[2]["parts"]["bench"]["result"]
    assert bench["inference"]["pformer_free"] is True
    assert bench["inference"]["generate"]["same_outputs"] and bench["inference"]["vqa"]["same_outputs"]
    assert [r["vocab"] for r in bench["vq"]["rows"]] == [100, 500]
    assert all(r["same_rows_fraction"] == 1.0 for r in bench["vq"]["rows"])


def test_a_part_past_its_limit_is_ended_and_the_next_part_runs(tmp_path, monkeypatch, capsys):
    gpu_check = import_script(os.path.join(REPO, "bench", "gpu_check.py"))
    monkeypatch.setitem(gpu_check.DRY_RUN_LIMITS, "env", 1)
    # shorter than the tiny backbones' build that starts the chain part, so that the part is still running at its limit
    monkeypatch.setitem(gpu_check.DRY_RUN_LIMITS, "chain", 3)
    monkeypatch.setenv("PYTHONPATH", REPO)
    summary = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "env,chain"])
    assert [e["status"] for e in summary["parts"].values()] == ["timeout", "timeout"]
    assert all(e["seconds"] < e["limit_s"] + 25 for e in summary["parts"].values())
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover  # the part's process group, torchrun and tiny builds included, is gone
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## 1. Environment: timeout" in md and "## 2. Tiny chain through torchrun: timeout" in md
    assert "[gpu-check] total" in capsys.readouterr().out
