"""The miniature demo pipeline at smoke scale, end to end, and the report's metric helpers."""
import json
import os
import subprocess
import sys

import pytest

from lavis_pformer.demo import report, vqa_scores

from helpers import REPO


ANSWER_SETS = {"color": ["red", "green", "blue"], "shape": ["circle", "square", "triangle"],
               "count": ["1", "2", "3"], "yesno": ["yes", "no"]}


def test_metric_helpers_on_a_hand_made_prediction_file(tmp_path):
    items = [
        {"question_id": 1, "answer": ["red"], "question_type": "color"},
        {"question_id": 2, "answer": ["blue"], "question_type": "color"},
        {"question_id": 3, "answer": ["green"], "question_type": "color"},
        {"question_id": 4, "answer": ["red"], "question_type": "color"},
        {"question_id": 5, "answer": ["circle"], "question_type": "shape"},
        {"question_id": 6, "answer": ["square"], "question_type": "shape"},
        {"question_id": 7, "answer": ["2"], "question_type": "count"},
        {"question_id": 8, "answer": ["3"], "question_type": "count"},
        {"question_id": 9, "answer": ["yes"], "question_type": "yesno"},
        {"question_id": 10, "answer": ["no"], "question_type": "yesno"},
    ]
    predictions = [
        {"question_id": 1, "answer": "red"},        # right
        {"question_id": 2, "answer": "red"},        # on-type, wrong
        {"question_id": 3, "answer": "a circle"},   # off-type
        {"question_id": 4, "answer": "Red."},       # right after normalisation
        {"question_id": 5, "answer": "blue"},       # off-type (a colour for a shape question)
        {"question_id": 6, "answer": "square"},     # right
        {"question_id": 7, "answer": "two"},        # right: number words -> digits
        {"question_id": 8, "answer": "1"},          # on-type, wrong
        {"question_id": 9, "answer": "yes"},        # right
        # 10: no prediction -> wrong, off-type
    ]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(predictions))
    m = vqa_scores.vqa_type_metrics(json.loads(path.read_text()), items, ANSWER_SETS)
    color, shape, count, yesno = (m["per_type"][t] for t in ("color", "shape", "count", "yesno"))
    assert color["accuracy"] == pytest.approx(2 / 4)
    assert color["on_type"] == pytest.approx(3 / 4)
    assert color["restricted_accuracy"] == pytest.approx(2 / 3)
    assert shape["accuracy"] == pytest.approx(1 / 2) and shape["on_type"] == pytest.approx(1 / 2)
    assert shape["restricted_accuracy"] == pytest.approx(1.0)
    assert count["accuracy"] == pytest.approx(1 / 2) and count["on_type"] == pytest.approx(1.0)
    assert count["restricted_accuracy"] == pytest.approx(1 / 2)
    assert yesno["accuracy"] == pytest.approx(1 / 2) and yesno["on_type"] == pytest.approx(1 / 2)
    assert m["overall"] == pytest.approx(5 / 10)
    assert m["overall_excl_yesno"] == pytest.approx(4 / 8)
    assert m["on_type_excl_yesno"] == pytest.approx(6 / 8)
    assert m["questions"] == 10


def test_restricted_accuracy_is_none_without_on_type_answers():
    items = [{"question_id": 1, "answer": ["red"], "question_type": "color"}]
    m = vqa_scores.vqa_type_metrics([{"question_id": 1, "answer": "circle"}], items, ANSWER_SETS)
    assert m["per_type"]["color"] == {"accuracy": 0.0, "restricted_accuracy": None, "on_type": 0.0, "questions": 1}


def test_loss_curve_parses_metric_logger_lines(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "Train: data epoch: [0]  [ 0/4]  eta: 0:00:01  lr: 0.000010  loss: 3.5000  time: 0.1\n"
        "noise\n"
        "Train: data epoch: [1]  [2/4]  eta: 0:00:01  lr: 0.000010  loss: 1.2500  loss_lm: 1.0  time: 0.1\n"
    )
    assert report.loss_curve(str(log)) == [(0, 3.5), (6, 1.25)]


def test_caption_metrics_read_colours_shapes_and_quadrants():
    references = {1: "a red circle at the top left.", 2: "a blue square at the top right and a red circle at the "
                  "bottom left.", 3: "a green triangle at the bottom right."}
    predictions = [
        {"image_id": 1, "caption": "a red circle at the top left"},                         # all right
        {"image_id": 2, "caption": "a blue square at the bottom left and a red circle at the top right"},  # swapped
        {"image_id": 3, "caption": "a green circle at the bottom right"},                   # wrong shape
    ]
    m = report.caption_metrics(predictions, references)
    assert m == {"object_accuracy": pytest.approx(2 / 3), "scene_accuracy": pytest.approx(1 / 3), "distinct": 3,
                 "images": 3}


def test_probe_reads_what_features_hold_and_nothing_more():
    import torch

    from lavis_pformer.demo import probe

    captions = ["a red circle at the top left.", "a blue square at the top right.",
                "a green triangle at the bottom left and an orange circle at the bottom right.",
                "a purple square at the top left, a yellow triangle at the top right and a red circle at the "
                "bottom right."] * 30
    colour, shape = probe.quadrant_targets(captions)
    assert colour[3].tolist() == [5, 4, 0, 1] and shape[3].tolist() == [2, 3, 0, 1]  # 0 = empty quadrant
    # features that hold the targets one-hot (plus noise) are read perfectly; pure noise is not
    torch.manual_seed(0)
    onehot = torch.cat([torch.nn.functional.one_hot(colour, 7).flatten(1), torch.nn.functional.one_hot(shape, 4)
                        .flatten(1)], 1).float()
    informative = onehot + 0.1 * torch.randn_like(onehot)
    acc = probe.probe_accuracy(informative[:80], (colour[:80], shape[:80]), informative[80:], (colour[80:], shape[80:]))
    assert acc == {"colour": 1.0, "shape": 1.0}
    noise = torch.randn(120, 40)
    acc = probe.probe_accuracy(noise[:80], (colour[:80], shape[:80]), noise[80:], (colour[80:], shape[80:]))
    assert acc["colour"] < 0.8 and acc["shape"] < 0.8


def _smoke(out, *extra):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lavis_pformer.demo.pipeline", "--smoke", "--out", str(out),
                           "--arms", "pformer_qa", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)


def test_pipeline_end_to_end_at_smoke_scale_repeats_exactly(tmp_path):
    """Two smoke runs (backbones built anew by each) write identical results.json; the report rebuilds alone."""
    first, second = _smoke(tmp_path / "a"), _smoke(tmp_path / "b")
    for proc in (first, second):
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "a"
    text = (out / "results.json").read_text()
    assert text == (tmp_path / "b" / "results.json").read_text()
    results = json.loads(text)
    arm = results["pformer_qa"]
    assert {"vqa_acc", "cider", "bleu4", "vqa_test", "caption_test", "vqa_acc_per_type", "caption_object_accuracy",
            "probes"} <= set(arm)
    assert set(arm["vqa_test"]["per_type"]) == {"color", "shape", "count", "yesno"}
    assert set(arm["probes"]) == {"vit", "qformer", "prompt", "all_empty"}
    assert arm["caption_objects"]["images"] == 16 and 1 <= arm["caption_objects"]["distinct"] <= 16
    meta = results["_meta"]
    assert set(meta["chance"]) >= {"color", "shape", "count", "yesno", "overall_excl_yesno"}
    assert set(meta["backbones"]["files"]) >= {"vit.pth", "lm/config.json", "bert/config.json"}
    for name in ("results.md", "loss_curves.png", "arms.png", "timings.json"):
        assert (out / name).stat().st_size > 0, name
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["runs"]) == {f"pformer_qa_{s}" for s in ("stage0", "stage1", "stage2", "eval_vqa",
                                                                  "eval_caption")}
    for name in timings["runs"]:
        assert (out / "configs" / f"{name}.yaml").exists(), name
    assert "VQA test, colour+shape+count" in first.stdout and "step report done" in first.stdout
    again = _smoke(out, "--report-only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "results.json").read_text() == text


def test_committed_backbones_match_their_manifest_and_tampering_is_refused(tmp_path):
    import shutil

    from lavis_pformer.demo import frozen_backbones as fb

    manifest = fb.verify(fb.COMMITTED, fb.RECIPE)
    assert set(manifest["files"]) >= {"vit.pth", "lm/config.json", "lm/vocab.json", "bert/config.json"}
    quality = manifest["quality"]
    assert set(quality["lm_text_ceiling_val"]["caption_before_bos"]) == {"color", "shape", "count", "yesno"}
    assert set(quality["vit_val_token_accuracy"]) >= {"colour", "shape", "quadrant"}
    copy = tmp_path / "backbones"
    shutil.copytree(fb.COMMITTED, copy)
    with open(copy / "vit.pth", "ab") as f:
        f.write(b"x")
    with pytest.raises(fb.BackbonesError, match="changed \\['vit.pth'\\].*make demo-backbones"):
        fb.verify(str(copy))
    (copy / "vit.pth").unlink()
    with pytest.raises(fb.BackbonesError, match="missing \\['vit.pth'\\]"):
        fb.verify(str(copy))
    with pytest.raises(fb.BackbonesError, match="another recipe"):
        fb.verify(fb.COMMITTED, dict(fb.RECIPE, seed=1))


def test_ablation_runs_the_table4_grid_and_shares_stage1(tmp_path, monkeypatch):
    """The grid's plan (which runs happen, with which weights and inputs), read from the configs it writes."""
    import yaml

    from lavis_pformer.demo import pipeline, run_configs

    def fake_prepare(out, seed, scale, times, shared=None, rebuild=False):
        out = str(out)
        ctx = {"out": out, "seed": seed, "scale": scale, "recipe": scale["recipe"], "world": str(tmp_path),
               "lm": "lm", "bert": "b", "vit": "v", "backbones": {}}
        for key in ("configs", "logs", "runs", "data"):
            ctx[key] = os.path.join(out, key)
            os.makedirs(ctx[key], exist_ok=True)
        return ctx

    ran, cells_seen = [], {}
    monkeypatch.setattr(pipeline, "prepare", fake_prepare)
    monkeypatch.setattr(run_configs, "subset", lambda src, dst, n: dst)
    monkeypatch.setattr(run_configs, "repeated_pairs", lambda world, data, repeat: "pairs.json")
    monkeypatch.setattr(pipeline, "run_jobs", lambda jobs, parallel, threads, **kw: ran.extend(jobs) or {})
    monkeypatch.setattr(report, "chain_metrics", lambda ctx, chain: {"vqa_acc": chain["w1"] + chain["w2"]})
    monkeypatch.setattr(report, "write_ablation_report",
                        lambda out, cells, seeds, scale: cells_seen.update(cells) or {"table": ""})
    pipeline.main(["--ablation", "--seeds", "0,1", "--out", str(tmp_path / "abl")])

    names = {j.name for j in ran}
    for job in ran:
        assert set(job.after) <= names  # every dependency is a job of the plan
    for seed in (0, 1):
        mine = {j.name.split("/", 1)[1]: yaml.safe_load(open(j.args[-1])) for j in ran
                if j.name.startswith(f"seed{seed}/")}
        stage0 = {n: c for n, c in mine.items() if n.endswith("_stage0")}
        stage1 = {n: c for n, c in mine.items() if n.endswith("_stage1")}
        stage2 = {n: c for n, c in mine.items() if n.endswith("_stage2")}
        assert sorted(c["model"]["qa_weight"] for c in stage0.values()) == [0.0, 1.0]
        # one stage-1 run without a teacher, one per teacher with w1 = 10
        assert sorted((c["model"]["alignment_weight"], bool(c["model"]["pformer_checkpoint"]))
                      for c in stage1.values()) == [(0, False), (10, True), (10, True)]
        assert len(stage2) == 7 and sorted(c["model"]["alignment_weight"] for c in stage2.values()) == [0, 0, 0, 100,
                                                                                                        100, 100, 100]
        for name, c in stage2.items():  # each stage 2 continues from the stage-1 run of its (teacher, w1)
            w1 = int(name.split("_w")[1].split("_")[0])
            source = c["model"]["pretrained"].split(os.sep)[-3]
            assert source.endswith("_stage1") and (w1 == 0) == ("_w0_" in source)
            assert mine[source]["model"]["cross_attention_freq"] == c["model"]["cross_attention_freq"]
        assert len([n for n in mine if n.endswith("_eval_vqa")]) == 7
    assert set(cells_seen) == {(v, w1, w2) for v in ("pformer", "pformer_qa") for w1, w2 in pipeline.GRID}
    assert all(len(v) == 2 for v in cells_seen.values())  # one entry per seed
    assert cells_seen[("pformer_qa", 10, 100)][0]["vqa_acc"] == 110
