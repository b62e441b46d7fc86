"""The tiny chain through train.py / evaluate.py, as a user runs it: stage 0 -> 1 -> 2 -> evaluation.

Uses the repository's projects/pformer/tiny configs unchanged (each stage reads the previous one's
output through ``<output_dir>/latest``).
"""
import json
import os

import pytest
import torch

from helpers import run_script, tiny_workdir

TINY = "projects/pformer/tiny"
ONE_EPOCH = ["run.max_epoch=1"]


def run_chain(workdir, llm, nproc=1):
    for stage in (0, 1, 2):
        run_script("train.py", f"{TINY}/pretrain_stage{stage}_{llm}.yaml", workdir, nproc=nproc, options=ONE_EPOCH)


def last_stats(workdir, name):
    log = open(os.path.join(workdir, "output", "tiny", name, "latest", "log.txt")).read().splitlines()
    return json.loads(log[-1])


@pytest.fixture(scope="module")
def opt_chain(tiny, tmp_path_factory):
    """Working folder where the tiny OPT chain (stage 0 -> 1 -> 2) ran in one CPU process."""
    workdir = tiny_workdir(tiny, tmp_path_factory.mktemp("opt_chain"))
    run_chain(workdir, "opt")
    return workdir


def test_opt_chain_one_process_then_evaluation(tiny, opt_chain):
    workdir = opt_chain
    assert {"train_loss_itc", "train_loss_itm", "train_loss_lm", "train_loss_align"} <= set(last_stats(workdir, "stage1_opt"))
    assert {"train_loss_lm", "train_loss_align"} <= set(last_stats(workdir, "stage2_opt"))
    stage1 = torch.load(os.path.join(workdir, "output/tiny/stage1_opt/latest/checkpoint_last.pth"), weights_only=True)
    assert "llm_proj.weight" in stage1["model"]
    stage2 = torch.load(os.path.join(workdir, "output/tiny/stage2_opt/latest/checkpoint_last.pth"), weights_only=True)
    assert not [k for k in stage2["model"] if k.startswith(("opt_model.", "pformer_teacher.", "visual_encoder."))]
    # stage 2 kept every Q-Former layer stage 1 trained (the tiny types share cross_attention_freq 1)
    crossattention = {k for k in stage1["model"] if ".crossattention." in k}
    assert crossattention and crossattention <= set(stage2["model"])
    record = stage2["model"]["_extra_state"]
    assert record["qformer"]["cross_attention_freq"] == 1 and record["aligned_to"]["llm_hidden_size"] == 48

    proc = run_script("evaluate.py", f"{TINY}/eval_vqa_opt.yaml", workdir)
    assert "| test | agg_metrics |" in proc.stdout
    questions = json.load(open(os.path.join(tiny["world"], "vqa_test_questions.json")))["questions"]
    result_dir = os.path.join(workdir, "output/tiny/eval_vqa_opt/latest")
    predictions = json.load(open(os.path.join(result_dir, "result", "test_vqa_result.json")))
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
    metrics = json.loads(open(os.path.join(result_dir, "evaluate.txt")).read().splitlines()[-1])
    assert 0.0 <= metrics["agg_metrics"] <= 100.0 and {"color", "shape", "count"} <= set(metrics)

    proc = run_script("evaluate.py", f"{TINY}/eval_caption_opt.yaml", workdir)
    assert "| test | CIDEr |" in proc.stdout
    caption_dir = os.path.join(workdir, "output/tiny/eval_caption_opt/latest")
    scores = json.loads(open(os.path.join(caption_dir, "evaluate.txt")).read().splitlines()[-1])["test"]
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(scores)


def test_opt_chain_two_gloo_processes(tiny, tmp_path):
    workdir = tiny_workdir(tiny, tmp_path)
    run_chain(workdir, "opt", nproc=2)
    assert "train_loss_align" in last_stats(workdir, "stage2_opt")


def test_t5_chain_one_process(tiny, tmp_path):
    workdir = tiny_workdir(tiny, tmp_path)
    run_chain(workdir, "t5")
    assert {"train_loss_lm", "train_loss_align"} <= set(last_stats(workdir, "stage2_t5"))
    proc = run_script("evaluate.py", f"{TINY}/eval_vqa_t5.yaml", workdir)
    assert "| test | agg_metrics |" in proc.stdout


def test_stage2_checkpoint_is_a_working_captioner(tiny, opt_chain, monkeypatch):
    import lavis_pformer  # noqa: F401
    from lavis.models import load_model_and_preprocess
    from PIL import Image

    monkeypatch.chdir(opt_chain)
    model, vis, _ = load_model_and_preprocess("blip2_opt_pformer", "tiny", is_eval=True)
    assert model.pformer_teacher is None
    model.load_checkpoint("output/tiny/stage2_opt/latest/checkpoint_last.pth")
    image = vis["eval"](Image.open(os.path.join(tiny["world"], "images", "test", os.listdir(os.path.join(tiny["world"], "images", "test"))[0])).convert("RGB"))
    captions = model.generate({"image": image.unsqueeze(0)}, max_length=8)
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_evaluating_a_stage1_checkpoint_is_a_clear_error(opt_chain):
    proc = run_script("evaluate.py", f"{TINY}/eval_vqa_opt.yaml", opt_chain, check=False,
                      options=["model.finetuned=output/tiny/stage1_opt/latest/checkpoint_last.pth"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a checkpoint of this model" in proc.stderr.strip().splitlines()[-2]
