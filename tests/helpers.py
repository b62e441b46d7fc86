"""Helpers of the test modules (fixtures are in conftest.py): running train.py / evaluate.py, building models
and P-Former teachers on the tiny backbones, run configs and an in-process ``runner_pformer``."""
import importlib.util
import os
import socket
import subprocess
import sys

import yaml

from lavis_pformer.tiny import SIZES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
               "--master_port", str(free_port())] + cmd[1:]
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


def import_script(path):
    """Import the script at ``path`` (a file outside any package, e.g. bench/*.py) as a module of its file name."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port():
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


TINY_OPT_WIDTH, TINY_T5_WIDTH = SIZES["opt"]["hidden_size"], SIZES["t5"]["d_model"]


def make_teacher(tiny, path, llm="opt", num_query_token=4):
    """A (random-headed) P-Former checkpoint for the tiny OPT or T5, as stage 0 would export it."""
    from lavis_pformer.pformer import save_untrained_pformer

    width = {"opt": TINY_OPT_WIDTH, "t5": TINY_T5_WIDTH}[llm]
    return save_untrained_pformer(path, tiny["bert"], num_query_token, width, tiny[llm], embed_dim=16, seed=0)


def run_section(output_dir, task, **run):
    return {
        "task": task, "runner": "runner_pformer", "lr_sched": "linear_warmup_cosine_lr",
        "init_lr": 1e-3, "min_lr": 1e-4, "warmup_lr": 1e-5, "warmup_steps": 2, "weight_decay": 0.05,
        "max_epoch": 1, "batch_size_train": 128, "batch_size_eval": 8, "num_workers": 0, "log_freq": 1,
        "seed": 42, "output_dir": output_dir, "amp": False, "evaluate": False, "train_splits": ["train"],
        "device": "cpu", "world_size": 1, "dist_url": "env://", "distributed": True, **run,
    }


def stage0_config(tiny, output_dir, corpus=None, **run):
    """pformer_opt (tiny) on a sentence corpus (default: the tiny world's 512 sentences)."""
    return {
        "model": {"arch": "pformer_opt", "model_type": "tiny", "bert_model": tiny["bert"], "opt_model": tiny["opt"]},
        "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": corpus or tiny["sentences"]}}}}},
        "run": run_section(output_dir, "pformer_pretrain", **run),
    }


def stage2_config(tiny, teacher, output_dir, **run):
    """blip2_opt_pformer (tiny, no stage-1 weights) with a frozen P-Former teacher on the tiny world's 64 images."""
    return {
        "model": {
            "arch": "blip2_opt_pformer", "model_type": "tiny", "load_pretrained": False,
            "bert_model": tiny["bert"], "opt_model": tiny["opt"], "pformer_checkpoint": teacher,
            "vit_config": dict(SIZES["vit"], checkpoint=tiny["vit"]),
        },
        "datasets": {"local_caption": {
            "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
            "build_info": {"images": {"storage": tiny["world"]},
                           "annotations": {"train": {"storage": os.path.join(tiny["world"], "captions_train.json")}}},
        }},
        "run": run_section(output_dir, "image_text_pretrain_pformer", **{"warmup_steps": 4, "batch_size_train": 16, **run}),
    }


def build_runner(cfg, workdir, monkeypatch, options=()):
    """``cli.build`` in this process and in ``workdir`` (a 1-rank gloo group, as train.py without torchrun).

    LAVIS's registry refuses to register ``output_dir`` / ``result_dir`` twice: they are reset first.
    """
    from lavis.common.registry import registry

    from lavis_pformer import cli

    monkeypatch.chdir(workdir)
    for key in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(key, None)
    with open("run.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    args = ["--cfg-path", "run.yaml"] + (["--options", *options] if options else [])
    return cli.build(cli.parse_args(args))
