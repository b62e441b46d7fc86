"""What ``train.py`` and ``evaluate.py`` do: LAVIS's repo-level scripts, after importing the plugin.

    python train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml [--options k=v ...] [--debug]
    torchrun --nproc_per_node=2 train.py --cfg-path ...      # CPU: gloo; GPUs: LAVIS's nccl path

A mistake in the input (config, data, checkpoint: a :class:`~lavis_pformer.errors.UserError`) ends the
run with one short block on stderr, what is wrong, where, and how to fix it, and exit status 2; any other
exception is an internal error and keeps its traceback (exit status 1). ``--debug`` shows the traceback
of a user error too. The run configuration is logged once the datasets and the model are built, so that
an early error is not buried under it.
"""
import argparse
import logging
import os
import random
import sys

import numpy as np
import torch
from omegaconf import OmegaConf

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_pformer.errors import ConfigError, MissingFileError, UserError, user_message
from lavis_pformer.resume import resolve_resume_path
from lavis_pformer.runtime import end_distributed, init_distributed, make_job_id, make_output_dir

DEFAULT_RUNNER = "runner_pformer"
USER_ERROR_STATUS = 2


def parse_args(argv=None, description="lavis-pformer"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the run configuration yaml")
    parser.add_argument(
        "--options", nargs="+",
        help="override settings of the yaml, as key=value (e.g. run.device=cpu model.pretrained=ckpt.pth)",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an input error (config, data, checkpoint) too")
    return parser.parse_args(argv)


def _choices(mapping_name):
    return ", ".join(sorted(registry.mapping[mapping_name]))


def load_user_config(cfg_path, options):
    """The run yaml with ``--options`` merged in, read the way LAVIS's ``Config`` reads them; errors name the
    file or option."""
    if not os.path.isfile(cfg_path):
        raise MissingFileError(f"--cfg-path {cfg_path}: no such file (cwd {os.getcwd()})")
    try:
        cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # yaml scanner / parser errors
        raise ConfigError(f"{cfg_path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"{cfg_path} must be a mapping with the sections model, datasets and run")
    options = list(options or [])
    if options and any("=" in o for o in options) and not all("=" in o and not o.startswith("=") for o in options):
        bad = [o for o in options if "=" not in o or o.startswith("=")]
        raise ConfigError(f"--options {' '.join(bad)}: each option is key=value, e.g. run.max_epoch=2")
    try:
        overrides = OmegaConf.from_dotlist(Config._convert_to_dot_list(None, options))
    except Exception as e:
        raise ConfigError(f"--options {' '.join(options)}: {' '.join(str(e).split())}") from None
    return OmegaConf.merge(cfg, overrides)


def check_config(cfg_path, options):
    """Fail early, with the choices, on what LAVIS would only assert or trip over later: the sections, the
    model's ``arch`` / ``model_type``, the dataset builders, the task, the runner and the lr schedule."""
    cfg = load_user_config(cfg_path, options)
    for section in ("model", "datasets", "run"):
        if not OmegaConf.is_dict(cfg.get(section)):
            raise ConfigError(f"{cfg_path}: the config has no `{section}:` section (it needs model, datasets and run)")
    model = cfg.model
    if "arch" not in model:
        raise ConfigError(f"{cfg_path}: the config has no model.arch; set e.g. `model: {{arch: blip2_opt_pformer}}`")
    model_cls = registry.get_model_class(model.arch)
    if model_cls is None:
        raise ConfigError(f"{cfg_path}: unknown model.arch '{model.arch}'. Registered models: "
                          f"{_choices('model_name_mapping')}")
    model_type = model.get("model_type")
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        known = ", ".join(sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT))
        raise ConfigError(
            f"{cfg_path}: unknown model.model_type '{model_type}' for arch '{model.arch}'. Choose one of: {known}"
        )
    for name in cfg.datasets:
        if registry.get_builder_class(name) is None:
            raise ConfigError(f"{cfg_path}: unknown dataset builder datasets.{name}. Registered builders: "
                              f"{_choices('builder_name_mapping')}")
    run = cfg.run
    if registry.get_task_class(run.get("task")) is None:
        raise ConfigError(f"{cfg_path}: unknown run.task {run.get('task')!r}. Registered tasks: "
                          f"{_choices('task_name_mapping')}")
    if registry.get_runner_class(run.get("runner", DEFAULT_RUNNER)) is None:
        raise ConfigError(f"{cfg_path}: unknown run.runner {run.get('runner')!r}. Registered runners: "
                          f"{_choices('runner_name_mapping')}")
    if not run.get("evaluate", False) and registry.get_lr_scheduler_class(run.get("lr_sched")) is None:
        raise ConfigError(f"{cfg_path}: unknown run.lr_sched {run.get('lr_sched')!r} (needed for training). "
                          f"Registered schedules: {_choices('lr_scheduler_name_mapping')}")
    return cfg


def use_own_vit_config(cfg, cfg_path, options):
    """A run yaml that sets ``model.vit_config`` gets exactly that ViT config (LAVIS would merge the model-type
    yaml's ``vit_config``, e.g. the tiny type's ``checkpoint``, into it key by key); ``--options
    model.vit_config.<key>=...`` still change single keys of whichever applies."""
    own = (OmegaConf.load(cfg_path).get("model") or {}).get("vit_config")
    if own is None or not OmegaConf.is_dict(own):
        return
    overrides = OmegaConf.from_dotlist(Config._convert_to_dot_list(None, list(options or [])))
    cfg.config.model.vit_config = OmegaConf.merge(own, (overrides.get("model") or {}).get("vit_config") or {})


def check_vit_precision(cfg):
    """Training with an fp16 ViT needs ``run.amp``: LAVIS's BLIP-2 training forward hands the ViT's fp16 output
    to the fp32 Q-Former outside any autocast (Blip2Qformer runs even the ViT outside ``maybe_autocast``), which
    fails with "mat1 and mat2 must have the same dtype" on GPUs and CPUs alike, after the model is loaded."""
    model, run = cfg.model_cfg, cfg.run_cfg
    if run.get("evaluate", False) or "vit_model" not in model or model.get("vit_model") is None:
        return
    if str(model.get("vit_precision", "fp16")) == "fp16" and not run.get("amp", False):
        raise ConfigError(
            "model.vit_precision is fp16 but run.amp is False: LAVIS's BLIP-2 training step feeds the fp16 ViT "
            "output to the fp32 Q-Former outside autocast and fails. Set run.amp: True (as LAVIS's BLIP-2 configs "
            "do; on a CPU it runs the step under CPU autocast) or model.vit_precision: fp32."
        )


def setup_seeds(run_cfg):
    seed = int(run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(args):
    """Config, distributed start, task, datasets, model and runner, in LAVIS's order."""
    import lavis_pformer  # noqa: F401  (registers the plugin and LAVIS's runners and schedulers)

    check_config(args.cfg_path, args.options)
    cfg = Config(args)
    use_own_vit_config(cfg, args.cfg_path, args.options)
    check_vit_precision(cfg)
    init_distributed(cfg.run_cfg)
    make_output_dir(cfg.run_cfg.output_dir)  # fail before the model is loaded, not after
    resolve_resume_path(cfg.run_cfg)  # before the runner moves <output_dir>/latest
    setup_seeds(cfg.run_cfg)
    setup_logger()
    job_id = make_job_id(cfg.run_cfg.output_dir)
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    cfg.pretty_print()
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", DEFAULT_RUNNER))
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def train(argv=None):
    runner = build(parse_args(argv, TRAIN_DESCRIPTION))
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
    runner = build(parse_args(argv, EVALUATE_DESCRIPTION))
    results = runner.evaluate(skip_reload=True)
    if get_rank() == 0:
        print(results_table(results), flush=True)
    logging.info("Outputs in %s", runner.output_dir)
    return runner, results


TRAIN_DESCRIPTION = "Train with LAVIS + lavis-pformer."
EVALUATE_DESCRIPTION = "Evaluate with LAVIS + lavis-pformer."
COMMANDS = {"train": (train, TRAIN_DESCRIPTION), "evaluate": (evaluate, EVALUATE_DESCRIPTION)}


def format_user_error(error, prog):
    """The short block printed for a user error."""
    return (f"{prog}: error ({error.kind}): {user_message(error)}\n"
            f"{prog}: this is a problem of the input, not of the software; rerun with --debug for the traceback.")


def main(command, argv=None):
    """Entry point of train.py / evaluate.py: runs ``command`` and turns a user error into exit status 2."""
    function, description = COMMANDS[command]
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = parse_args(argv, description).debug
    try:
        result = function(argv)
    except BaseException as error:
        end_distributed(wait_for_others=False)  # every rank leaves the process group, whatever happened
        if debug or not isinstance(error, UserError):
            raise
        for handler in logging.getLogger().handlers:  # the log lines before it first: the block comes last
            handler.flush()
        sys.stdout.flush()
        sys.stderr.write(format_user_error(error, f"{command}.py") + "\n")  # every rank (LAVIS mutes print)
        sys.stderr.flush()
        raise SystemExit(USER_ERROR_STATUS) from None
    end_distributed()
    return result
