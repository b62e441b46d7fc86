"""What ``train.py`` and ``evaluate.py`` do: LAVIS's repo-level scripts, after importing the plugin.

    python train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml [--options k=v ...]
    torchrun --nproc_per_node=2 train.py --cfg-path ...      # CPU: gloo; GPUs: LAVIS's nccl path
"""
import argparse
import logging
import random

import numpy as np
import torch
from omegaconf import OmegaConf

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_pformer.runtime import init_distributed, make_job_id, make_output_dir, resolve_resume_path

DEFAULT_RUNNER = "runner_pformer"


def parse_args(argv=None, description="lavis-pformer"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the run configuration yaml")
    parser.add_argument(
        "--options", nargs="+",
        help="override settings of the yaml, as key=value (e.g. run.device=cpu model.pretrained=ckpt.pth)",
    )
    return parser.parse_args(argv)


def check_model_choice(cfg_path, options):
    """Fail early, with the choices, on an unknown ``arch`` or ``model_type`` (LAVIS asserts later)."""
    cfg = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(list(options or [])))
    model = cfg.get("model")
    if model is None or "arch" not in model:
        raise ValueError(f"{cfg_path}: the config has no model.arch; set e.g. `model: {{arch: blip2_opt_pformer}}`")
    model_cls = registry.get_model_class(model.arch)
    if model_cls is None:
        known = ", ".join(sorted(registry.mapping["model_name_mapping"]))
        raise ValueError(f"{cfg_path}: unknown model.arch '{model.arch}'. Registered models: {known}")
    model_type = model.get("model_type")
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        known = ", ".join(sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT))
        raise ValueError(
            f"{cfg_path}: unknown model.model_type '{model_type}' for arch '{model.arch}'. Choose one of: {known}"
        )


def setup_seeds(run_cfg):
    seed = int(run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(args):
    """Config, distributed start, task, datasets, model and runner, in LAVIS's order."""
    import lavis_pformer  # noqa: F401  (registers the plugin and LAVIS's runners and schedulers)

    check_model_choice(args.cfg_path, args.options)
    cfg = Config(args)
    init_distributed(cfg.run_cfg)
    make_output_dir(cfg.run_cfg.output_dir)  # fail before the model is loaded, not after
    resolve_resume_path(cfg.run_cfg)  # before the runner moves <output_dir>/latest
    setup_seeds(cfg.run_cfg)
    setup_logger()
    cfg.pretty_print()
    job_id = make_job_id(cfg.run_cfg.output_dir)
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", DEFAULT_RUNNER))
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def train(argv=None):
    runner = build(parse_args(argv, "Train with LAVIS + lavis-pformer."))
    runner.train()
    logging.info("Outputs in %s", runner.output_dir)
    return runner


def results_table(results):
    """Markdown table of ``{split: {metric: value}}`` (what ``RunnerBase.evaluate`` returns on rank 0)."""
    rows = [(split, k, v) for split, metrics in (results or {}).items() for k, v in (metrics or {}).items()
            if isinstance(v, (int, float))]
    lines = ["| split | metric | value |", "|---|---|---|"]
    lines += [f"| {split} | {k} | {v:.4f} |" for split, k, v in rows]
    return "\n".join(lines)


def evaluate(argv=None):
    runner = build(parse_args(argv, "Evaluate with LAVIS + lavis-pformer."))
    results = runner.evaluate(skip_reload=True)
    if get_rank() == 0:
        print(results_table(results), flush=True)
    logging.info("Outputs in %s", runner.output_dir)
    return runner, results
