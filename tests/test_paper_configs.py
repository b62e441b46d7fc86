"""The paper-scale configs parse with LAVIS's Config and build with backbones pointed at tiny local dirs."""
import argparse
import glob
import json
import os

import pytest

import lavis_pformer  # noqa: F401
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis_pformer.text import QA_PROMPT

from helpers import REPO

TRAIN = os.path.join(REPO, "projects", "pformer", "train")


def load(cfg_name, *options):
    return Config(argparse.Namespace(cfg_path=os.path.join(TRAIN, cfg_name), options=list(options)))


@pytest.mark.parametrize("name,llm", [("pretrain_stage0_opt2.7b.yaml", "opt"), ("pretrain_stage0_flant5xl.yaml", "t5")])
def test_stage0_paper_config(name, llm, tiny):
    cfg = load(name)
    run, model = cfg.run_cfg, cfg.model_cfg
    assert (run.init_lr, run.min_lr, run.warmup_lr, run.warmup_steps) == (1e-4, 1e-5, 1e-6, 2000)
    assert (run.weight_decay, run.max_epoch, run.batch_size_train, run.amp) == (0.05, 5, 128, True)
    assert model.bert_model == "bert-base-uncased" and model.num_query_token == 32
    assert model.get("opt_model", model.get("t5_model")) in ("facebook/opt-2.7b", "google/flan-t5-xl")
    assert registry.get_task_class(run.task) is not None
    assert "sentence_corpus" in cfg.datasets_cfg
    llm_key = {"opt": "opt_model", "t5": "t5_model"}[llm]
    cfg = load(name, f"model.bert_model={tiny['bert']}", f"model.{llm_key}={tiny[llm]}", "model.llm_precision=fp32")
    built = registry.get_model_class(cfg.model_cfg.arch).from_config(cfg.model_cfg)
    assert built.pformer.metadata["num_query_token"] == 32


def test_every_run_script_names_an_existing_config():
    for script in glob.glob(os.path.join(REPO, "run_scripts", "pformer", "**", "*.sh"), recursive=True):
        text = open(script).read()
        for token in text.split():
            if token.startswith("projects/pformer/"):
                assert os.path.isfile(os.path.join(REPO, token)), (script, token)


EVAL = os.path.join(REPO, "projects", "pformer", "eval")
EVAL_TASKS = {"vqav2": ("vqa", "coco_vqa"), "okvqa": ("vqa", "ok_vqa"), "gqa": ("gqa", "gqa"),
              "nocaps": ("captioning_pformer", "nocaps"), "caption": ("captioning_pformer", "coco_caption")}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EVAL, "*.yaml"))))
def test_eval_configs_point_at_lavis_tasks_and_builders(path):
    cfg = Config(argparse.Namespace(cfg_path=path, options=[]))
    task, builder = EVAL_TASKS[os.path.basename(path).split("_")[0]]
    assert cfg.run_cfg.task == task and registry.get_task_class(task) is not None
    assert list(cfg.datasets_cfg) == [builder] and registry.get_builder_class(builder) is not None
    assert cfg.run_cfg.evaluate is True and cfg.run_cfg.num_beams == 5
    assert cfg.model_cfg.arch in ("blip2_opt_pformer", "blip2_t5_pformer") and cfg.model_cfg.load_finetuned
    if task != "captioning_pformer":
        assert cfg.run_cfg.prompt == QA_PROMPT and cfg.run_cfg.max_len == 10
        assert cfg.run_cfg.inference_method == "generate"
    assert cfg.model_cfg.get("apply_lemmatizer", False) == ("okvqa" in path)


@pytest.mark.parametrize("name", ["vqav2_zeroshot_opt2.7b.yaml", "okvqa_zeroshot_flant5xl.yaml"])
def test_vqa_eval_config_builds_lavis_datasets_on_local_files(name, tiny):
    import lavis.tasks as tasks

    world = tiny["world"]
    split = "val" if "vqav2" in name else "test"
    files = [f"{world}/vqa_val.json", f"{world}/vqa_answer_list.json",
             f"{world}/vqa_val_questions.json", f"{world}/vqa_val_annotations.json"]
    builder = "coco_vqa" if "vqav2" in name else "ok_vqa"
    listing = "[" + ",".join(files) + "]"
    cfg = Config(argparse.Namespace(cfg_path=os.path.join(EVAL, name), options=[
        f"datasets.{builder}.build_info.annotations.{split}.url={listing}",
        f"datasets.{builder}.build_info.annotations.{split}.storage={listing}",
        f"datasets.{builder}.build_info.images.storage={world}",
        f"datasets.{builder}.vis_processor.eval.image_size=32",
        # LAVIS's ok_vqa default also lists a train split: offline, every listed split must be local
        *([f"datasets.ok_vqa.build_info.annotations.train.url=[{files[0]}]",
           f"datasets.ok_vqa.build_info.annotations.train.storage=[{files[0]}]"] if builder == "ok_vqa" else []),
    ]))
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    dataset = datasets[builder][split]
    assert len(dataset) == len(json.load(open(files[0])))
    assert task.ques_files[split] == files[2] and task.anno_files[split] == files[3]
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["text_input"]


def test_stage1_laion_config_mixes_coco_vg_and_shards(tiny, tmp_path):
    """pretrain_stage1_laion.yaml: stage 1's model and optimizer, LAVIS's COCO and VG builders and the shards,
    mixed by ratio on the iteration runner; its shards section builds on the converter's shards."""
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor

    from lavis_pformer.datasets.to_shards import convert

    pattern, _, _ = convert([f"{tiny['world']}/captions_train.json"], tiny["world"], str(tmp_path / "shards"), 16)
    cfg = load("pretrain_stage1_laion.yaml", f"datasets.image_text_shards.build_info.storage={pattern}")
    stage1, run = load("pretrain_stage1.yaml"), cfg.run_cfg
    assert cfg.model_cfg == stage1.model_cfg
    for key in ("task", "lr_sched", "init_lr", "min_lr", "warmup_lr", "warmup_steps", "weight_decay",
                "batch_size_train", "amp", "seed"):
        assert run[key] == stage1.run_cfg[key], key
    assert run.runner == "runner_iter_pformer" and run.max_iters % run.iters_per_inner_epoch == 0
    assert list(cfg.datasets_cfg) == ["coco_caption", "vg_caption", "image_text_shards"]
    assert set(run.train_dataset_ratios) == set(cfg.datasets_cfg)
    assert all(registry.get_builder_class(name) is not None for name in cfg.datasets_cfg)
    built = registry.get_builder_class("image_text_shards")(cfg.datasets_cfg.image_text_shards).build_datasets()
    shards = built["train"]
    assert len(shards.shards) == 4 and shards.sample_format.caption_key == "txt" and shards.bad_share.max_share == 0.01
    assert isinstance(shards.vis_processor, Blip2ImageTrainProcessor)
    assert next(iter(shards))["image"].shape == (3, 224, 224)
