"""Multi-node launch: every run script goes through run_scripts/pformer/launch.sh (NPROC, NNODES, NODE_RANK,
MASTER_ADDR / MASTER_PORT or a c10d RDZV_ENDPOINT), and SLURM's example batch script.

- Every script of run_scripts/pformer/{train,eval} builds the expected torchrun command (the launcher replaced by
  ``echo``): its own config and default NPROC, multi-node arguments, key=value arguments as --options.
- 2 nodes x 1 process on localhost through slurm_example.sbatch (srun / scontrol stand-ins in tests/stubs that
  run the per-node command twice on this machine), meeting at a c10d rendezvous, against the classic form (one
  node, NPROC=2, static rendezvous): one output folder, one checkpoint, the same logged losses and the same weights.
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import REPO, free_port, make_teacher, only_run_dir, stage2_config

LAUNCH = os.path.join(REPO, "run_scripts", "pformer", "launch.sh")
SBATCH = os.path.join(REPO, "run_scripts", "pformer", "slurm_example.sbatch")
STUBS = os.path.join(REPO, "tests", "stubs")
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "run_scripts", "pformer", "*", "*.sh")))
TORCHRUN = f"{sys.executable} -m torch.distributed.run"


def bash(cmd, env=(), check=True, cwd=REPO):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID")}
    proc = subprocess.run(["bash", *cmd], cwd=cwd, env={**clean, **dict(env)}, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_there_are_twenty_one_run_scripts_and_none_calls_torchrun_itself():
    assert len(SCRIPTS) == 21
    for script in SCRIPTS:
        text = open(script).read()
        assert "torchrun" not in text and "nproc_per_node" not in text, script
        assert os.access(script, os.X_OK), script


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "run_scripts")))
def test_every_run_script_builds_the_torchrun_command(script):
    text = open(script).read()
    cfg = re.search(r"(projects/pformer/\S+\.yaml)", text).group(1)
    entry = "train.py" if "/train/" in script else "evaluate.py"
    default_nproc = re.search(r"NPROC=\$\{NPROC:-(\d+)\}", text).group(1)
    echo = {"TORCHRUN": "echo"}
    one = bash([script, "run.max_epoch=2", "run.seed=3"], echo).stdout.split()
    assert one == ["--nnodes=1", f"--nproc_per_node={default_nproc}", "--node_rank=0", "--master_addr=127.0.0.1",
                   "--master_port=29500", entry, "--cfg-path", cfg, "--options", "run.max_epoch=2", "run.seed=3"]
    static = bash([script, "--options", "a=1", "--debug"],
                  dict(echo, NPROC="4", NNODES="3", NODE_RANK="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"))
    assert static.stdout.split() == ["--nnodes=3", "--nproc_per_node=4", "--node_rank=2", "--master_addr=10.0.0.1",
                                     "--master_port=1234", entry, "--cfg-path", cfg, "--options", "a=1", "--debug"]
    rdzv = bash([script], dict(echo, NNODES="2", RDZV_ENDPOINT="head:29400", RDZV_ID="job7"))
    assert rdzv.stdout.split() == ["--nnodes=2", f"--nproc_per_node={default_nproc}", "--rdzv_backend=c10d",
                                   "--rdzv_endpoint=head:29400", "--rdzv_id=job7", entry, "--cfg-path", cfg]


@pytest.mark.parametrize("env,message", [
    (dict(NNODES="2"), "set MASTER_ADDR"),
    (dict(NNODES="2", NODE_RANK="2", MASTER_ADDR="h"), "NODE_RANK must be 0 .. 1"),
    (dict(NPROC="0"), "NPROC must be a positive integer"),
    (dict(NNODES="2", RDZV_ENDPOINT="head"), "host:port"),
])
def test_launch_settings_that_cannot_work_exit_2(env, message):
    proc = bash([SCRIPTS[0]], dict(env, TORCHRUN="echo"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


def test_slurm_example_meets_at_the_first_node(tmp_path):
    env = dict(PATH=f"{STUBS}:{os.environ['PATH']}", STUB_LOG_DIR=str(tmp_path), STUB_HOSTNAMES="gpu-a gpu-b",
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4",
               TORCHRUN="echo")
    bash([SBATCH, os.path.join(REPO, "run_scripts/pformer/train/pretrain_stage1.sh"), "run.seed=1"], env)
    for node in (0, 1):
        assert open(tmp_path / f"node{node}.out").read().split() == [
            "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a:29400",
            "--rdzv_id=4242", "train.py", "--cfg-path", "projects/pformer/train/pretrain_stage1.yaml",
            "--options", "run.seed=1"]


def train_stats(run_dir):
    lines = open(os.path.join(run_dir, "log.txt")).read().split("\n}\n", 1)[1].splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):
    """The same tiny stage-2 run started as 2 nodes x 1 process (SLURM example, c10d) and as 1 node x 2 processes."""
    work = tmp_path_factory.mktemp("multinode")
    teacher = make_teacher(tiny, work / "pformer.pth")
    cfg = stage2_config(tiny, teacher, "unused", max_epoch=2, batch_size_train=4)
    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    common = dict(TORCHRUN=TORCHRUN, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    nodes = dict(common, PATH=f"{STUBS}:{os.environ['PATH']}", STUB_LOG_DIR=str(work), STUB_HOSTNAMES="localhost",
                 SLURM_JOB_NODELIST="localhost", SLURM_NNODES="2", SLURM_JOB_ID="77", NPROC="1",
                 RDZV_ENDPOINT=f"localhost:{free_port()}")
    bash([SBATCH, LAUNCH, "train.py", str(cfg_path), f"run.output_dir={work / 'two_nodes'}"], nodes)
    classic = dict(common, NPROC="2", MASTER_PORT=str(free_port()))
    bash([LAUNCH, "train.py", str(cfg_path), f"run.output_dir={work / 'one_node'}"], classic)
    logs = [open(work / f"node{i}.err").read() for i in (0, 1)]
    return {"two_nodes": only_run_dir(work / "two_nodes"), "one_node": only_run_dir(work / "one_node"), "logs": logs}


def test_two_nodes_share_one_output_folder_and_one_checkpoint_per_epoch(launched):
    run_dir = launched["two_nodes"]  # only_run_dir: exactly one job folder, and latest points at it
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pth")) == [
        "checkpoint_0.pth", "checkpoint_0.rng.pth", "checkpoint_1.pth", "checkpoint_1.rng.pth", "checkpoint_last.pth"]
    assert len(torch.load(os.path.join(run_dir, "checkpoint_1.rng.pth"), weights_only=True)["ranks"]) == 2
    # one launcher per node; rank 0 (the one that logs) ran under exactly one of them
    assert sorted("Start training" in log for log in launched["logs"]) == [False, True]


def test_two_nodes_train_as_one_node_with_two_processes(launched):
    a, b = (train_stats(launched[k]) for k in ("two_nodes", "one_node"))
    assert len(a) == 2 and a == b  # every logged loss, loss term and lr of both epochs
    ca, cb = (torch.load(os.path.join(launched[k], "checkpoint_last.pth"), weights_only=True)["model"]
              for k in ("two_nodes", "one_node"))
    for key in ca:
        if key != "_extra_state":
            assert torch.equal(ca[key], cb[key]), key
