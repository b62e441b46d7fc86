"""Run configs on the tiny backbones and an in-process ``runner_pformer``, shared by test_resume.py and
test_bad_inputs.py."""
import os

import torch
import yaml

from lavis_pformer.tiny import SIZES

TINY_OPT_WIDTH, TINY_T5_WIDTH = SIZES["opt"]["hidden_size"], SIZES["t5"]["d_model"]


def make_teacher(tiny, path, llm="opt", num_query_token=4):
    """A (random-headed) P-Former checkpoint for the tiny OPT or T5, as stage 0 would export it."""
    from lavis_pformer.pformer import PFormer

    torch.manual_seed(0)
    width = {"opt": TINY_OPT_WIDTH, "t5": TINY_T5_WIDTH}[llm]
    PFormer.from_bert(tiny["bert"], num_query_token, width, tiny[llm], embed_dim=16).save(str(path))
    return str(path)


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


def own_process_group():
    """Generator for a module fixture: ends the 1-rank group that cli.build starts, if it started it."""
    import torch.distributed as dist

    existed = dist.is_initialized()
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()
