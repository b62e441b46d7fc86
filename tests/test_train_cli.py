"""train.py driven like a user would: one CPU process, torchrun with 2 gloo processes, and the zoo."""
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from lavis_pformer.pformer import PFormer

from helpers import only_run_dir, run_script


def stage0_config(tiny, llm="opt", output_dir="out", **run):
    llm_key = {"opt": "opt_model", "t5": "t5_model"}[llm]
    return {
        "model": {"arch": f"pformer_{llm}", "model_type": "tiny", "bert_model": tiny["bert"], llm_key: tiny[llm]},
        "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": tiny["sentences"]}}}}},
        "run": {
            "task": "pformer_pretrain", "runner": "runner_pformer", "lr_sched": "linear_warmup_cosine_lr",
            "init_lr": 1e-3, "min_lr": 1e-4, "warmup_lr": 1e-5, "warmup_steps": 2, "weight_decay": 0.05,
            "max_epoch": 1, "batch_size_train": 128, "batch_size_eval": 8, "num_workers": 0, "log_freq": 1,
            "seed": 42, "output_dir": output_dir, "amp": False, "evaluate": False, "train_splits": ["train"],
            "device": "cpu", "world_size": 1, "dist_url": "env://", "distributed": True, **run,
        },
    }


def check_stage0_outputs(run_dir, tiny_llm_width=48):
    log = open(os.path.join(run_dir, "log.txt")).read().splitlines()
    stats = json.loads(log[-1])
    for term in ("train_loss", "train_loss_lm", "train_loss_c", "train_loss_vq"):
        assert term in stats, stats
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint_0.pth"), map_location="cpu", weights_only=False)
    assert checkpoint["model"] and all(k.startswith("pformer.") for k in checkpoint["model"])
    teacher = PFormer.load(os.path.join(run_dir, "pformer.pth"), num_query_token=4, llm_hidden_size=tiny_llm_width)
    assert torch.equal(teacher.llm_proj.weight, checkpoint["model"]["pformer.llm_proj.weight"])


def test_train_stage0_single_cpu_process(tiny, tmp_path):
    proc = run_script("train.py", stage0_config(tiny), str(tmp_path))
    run_dir = only_run_dir(tmp_path / "out")  # absolute, under the working directory
    check_stage0_outputs(run_dir)
    assert "loss_vq" in proc.stderr + proc.stdout


def test_train_stage0_t5_with_options(tiny, tmp_path):
    run_script("train.py", stage0_config(tiny, "t5"), str(tmp_path), options=["run.output_dir=custom"])
    run_dir = only_run_dir(tmp_path / "custom")
    stats = json.loads(open(os.path.join(run_dir, "log.txt")).read().splitlines()[-1])
    assert "train_loss_c" in stats and "train_loss_vq" not in stats


def test_train_stage0_torchrun_two_gloo_processes(tiny, tmp_path):
    proc = run_script("train.py", stage0_config(tiny, batch_size_train=64), str(tmp_path), nproc=2)
    run_dir = only_run_dir(tmp_path / "out")  # one job id for both ranks
    check_stage0_outputs(run_dir)
    assert "distributed init" not in proc.stdout or "gloo" not in proc.stderr  # no nccl attempted
    assert "Averaged loss terms" in proc.stderr + proc.stdout


def test_user_error_on_two_gloo_ranks_ends_every_rank_with_status_2(tiny, tmp_path):
    """A user error once the process group is up (here a resume checkpoint that does not exist): the ranks leave
    the group and exit with status 2 and no traceback; torchrun (exit status 1) names status 2 as the root cause,
    and no rank dies of SIGABRT or SIGSEGV (a rank still running when the first one fails may get torchrun's
    SIGTERM)."""
    proc = run_script("train.py", stage0_config(tiny), str(tmp_path), nproc=2, check=False,
                      options=["run.resume_ckpt_path=missing/checkpoint_0.pth"])
    assert proc.returncode == 1
    assert "train.py: error (missing file): run.resume_ckpt_path: no file at missing/checkpoint_0.pth" in proc.stderr
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", proc.stderr, flags=re.S)
    assert root_cause and root_cause.group(1) == "2", proc.stderr[-3000:]
    assert not re.search(r"exitcode\s*:\s*-(6|11)\b", proc.stderr), proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr  # torchrun's own only


def test_train_py_ends_the_process_group_it_started(tiny, tmp_path, monkeypatch):
    """cli.main (what train.py runs) leaves no process group behind, after a finished run and after a user error;
    a group that existed before it (the caller's) is left to the caller."""
    import torch.distributed as dist
    from lavis.common.registry import registry

    from lavis_pformer import cli

    monkeypatch.chdir(tmp_path)
    with open("run.yaml", "w") as f:
        yaml.safe_dump(stage0_config(tiny), f)

    def train(*options):
        for key in ("output_dir", "result_dir"):  # LAVIS's registry refuses to register them twice
            registry.mapping["paths"].pop(key, None)
        return cli.main("train", ["--cfg-path", "run.yaml"] + (["--options", *options] if options else []))

    assert not dist.is_initialized()
    train()
    assert not dist.is_initialized()
    with pytest.raises(SystemExit) as exit_:
        train("run.resume_ckpt_path=missing.pth")
    assert exit_.value.code == 2 and not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_user_error_is_a_short_message_status_2_and_debug_shows_the_traceback(tiny, tmp_path):
    """train.py as a user runs it: a config mistake prints a few lines and exits with status 2; --debug
    re-raises it with its traceback (Python's exit status 1)."""
    cfg = stage0_config(tiny)
    cfg["model"]["arch"] = "pformer_gpt"
    proc = run_script("train.py", cfg, str(tmp_path), check=False)
    assert proc.returncode == 2
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert "Traceback" not in proc.stderr and len(output) <= 4, output
    assert output[-2].startswith("train.py: error (configuration): ") and "unknown model.arch 'pformer_gpt'" in output[-2]
    assert "pformer_opt" in output[-2] and "--debug" in output[-1]
    cfg = stage0_config(tiny)
    cfg["model"]["model_type"] = "opt13b"
    proc = run_script("train.py", cfg, str(tmp_path), check=False, args=["--debug"])
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: " in proc.stderr and "unknown model.model_type 'opt13b'" in proc.stderr


def test_load_model_and_preprocess_and_zoo(tiny, tmp_path, monkeypatch):
    import lavis_pformer  # noqa: F401
    from lavis.models import ModelZoo, load_model_and_preprocess

    zoo = ModelZoo().model_zoo
    assert {"pformer_opt2.7b", "pformer_opt6.7b", "tiny"} <= set(zoo["pformer_opt"])
    assert {"pformer_flant5xl", "pformer_flant5xxl", "tiny"} <= set(zoo["pformer_t5"])
    # The tiny model type reads output/tiny/backbones relative to the working directory.
    root = os.path.dirname(os.path.dirname(tiny["bert"]))
    os.makedirs(tmp_path / "output")
    shutil.copytree(root, tmp_path / "output" / "tiny")
    monkeypatch.chdir(tmp_path)
    model, _, text_processors = load_model_and_preprocess("pformer_opt", "tiny", is_eval=True)
    caption = text_processors["eval"]("A Red circle, on the LEFT!")
    assert caption == "a red circle, on the left"  # blip_caption: lower case, no "!"
    out = model.generate({"text_input": [caption]}, max_length=4)
    assert len(out) == 1 and isinstance(out[0], str)
    assert not model.training
