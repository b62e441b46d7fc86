"""Shared fixtures: tiny backbones built offline once per session, and a runner for train.py."""
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny backbones and sentence corpus: keys bert, opt, t5, sentences."""
    from lavis_pformer.tiny import build_all

    return build_all(str(tmp_path_factory.mktemp("tiny")))


def run_script(script, cfg, workdir, nproc=1, options=(), timeout=600, check=True, args=()):
    """Run ``script`` (train.py / evaluate.py) in ``workdir``; returns the CompletedProcess.

    ``cfg`` is a config dict (written to workdir/run.yaml) or the path of a yaml file.
    nproc > 1 runs under ``torchrun --nproc_per_node=nproc`` (gloo on CPU). ``args``: more arguments
    (e.g. ``--debug``). ``check``: a non-zero exit status raises AssertionError with the output.
    """
    if isinstance(cfg, dict):
        cfg_path = os.path.join(workdir, "run.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
    else:
        cfg_path = os.path.join(REPO, cfg)
    cmd = [sys.executable, os.path.join(REPO, script), "--cfg-path", cfg_path]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port())] + cmd[1:]
    cmd += list(args)
    if options:
        cmd += ["--options", *options]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def tiny_workdir(tiny, workdir):
    """Make ``workdir/output/tiny`` look like ``python -m lavis_pformer.tiny --out output/tiny`` was run there,
    so that the repository's projects/pformer/tiny configs run unchanged (outputs stay in workdir)."""
    root = os.path.dirname(os.path.dirname(tiny["bert"]))
    os.makedirs(os.path.join(workdir, "output", "tiny"), exist_ok=True)
    for name in ("backbones", "world"):
        os.symlink(os.path.join(root, name), os.path.join(workdir, "output", "tiny", name))
    return str(workdir)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_run_dir(output_dir):
    """The single job folder a run created under ``output_dir``."""
    output_dir = str(output_dir)
    runs = [d for d in os.listdir(output_dir) if d != "latest" and os.path.isdir(os.path.join(output_dir, d))]
    assert len(runs) == 1, runs
    run_dir = os.path.join(output_dir, runs[0])
    assert os.path.realpath(os.path.join(output_dir, "latest")) == os.path.realpath(run_dir)
    return run_dir


def build_model(arch, model_type, **overrides):
    """``from_config`` of a registered model: its model-type yaml merged with ``overrides``."""
    from omegaconf import OmegaConf

    import lavis_pformer  # noqa: F401
    from lavis.common.registry import registry

    cls = registry.get_model_class(arch)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    return cls.from_config(cfg)


def tiny_stage0_overrides(tiny, llm="opt", **extra):
    llm_key = {"opt": "opt_model", "t5": "t5_model"}[llm]
    return dict(bert_model=tiny["bert"], llm_precision="fp32", num_query_token=4, max_txt_len=24,
                embed_dim=16, **{llm_key: tiny[llm]}, **extra)
