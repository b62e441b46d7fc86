"""The paper-scale configs parse with LAVIS's Config and build with backbones pointed at tiny local dirs."""
import argparse
import glob
import os

import pytest

import lavis_pformer  # noqa: F401
from conftest import REPO
from lavis.common.config import Config
from lavis.common.registry import registry

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
