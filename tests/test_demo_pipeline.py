"""The miniature demo pipeline at smoke scale, end to end, and the report's metric helpers."""
import json
import os
import subprocess
import sys

import pytest

from lavis_pformer.demo import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    m = report.vqa_type_metrics(json.loads(path.read_text()), items, ANSWER_SETS)
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
    m = report.vqa_type_metrics([{"question_id": 1, "answer": "circle"}], items, ANSWER_SETS)
    assert m["per_type"]["color"] == {"accuracy": 0.0, "restricted_accuracy": None, "on_type": 0.0, "questions": 1}


def test_loss_curve_parses_metric_logger_lines(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "Train: data epoch: [0]  [ 0/4]  eta: 0:00:01  lr: 0.000010  loss: 3.5000  time: 0.1\n"
        "noise\n"
        "Train: data epoch: [1]  [2/4]  eta: 0:00:01  lr: 0.000010  loss: 1.2500  loss_lm: 1.0  time: 0.1\n"
    )
    assert report.loss_curve(str(log)) == [(0, 3.5), (6, 1.25)]


def test_pipeline_end_to_end_at_smoke_scale(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lavis_pformer.demo.pipeline", "--smoke", "--out", str(out),
         "--arms", "pformer_qa"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert {"vqa_acc", "cider", "bleu4", "vqa_test", "caption_test"} <= set(results["pformer_qa"])
    assert set(results["pformer_qa"]["vqa_test"]["per_type"]) == {"color", "shape", "count", "yesno"}
    for name in ("results.md", "loss_curves.png", "arms.png", "chains.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("pformer_qa_stage0", "pformer_qa_stage1", "pformer_qa_stage2", "pformer_qa_eval_vqa",
                 "pformer_qa_eval_caption"):
        assert (out / "configs" / f"{name}.yaml").exists(), name
    assert "VQA test accuracy" in proc.stdout and "step report done" in proc.stdout
    # the report can be rebuilt from the runs alone
    again = subprocess.run(
        [sys.executable, "-m", "lavis_pformer.demo.pipeline", "--smoke", "--out", str(out), "--arms", "pformer_qa",
         "--report-only"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["pformer_qa"]["vqa_acc"] == results["pformer_qa"]["vqa_acc"]


def test_ablation_runs_the_table4_grid_and_shares_stage1(tmp_path, monkeypatch):
    """The grid's plan (which runs happen, with which weights), with the runs themselves replaced by records."""
    from lavis_pformer.demo import pipeline

    runs = []

    def fake_prepare(out, seed, scale_name, steps, threads=None, world_seed=None, shared=None, scale=None):
        ctx = {"out": out, "seed": seed, "scale": scale, "timings": {}, "world": "w", "lm": "lm", "bert": "b",
               "vit": "v", "data": str(tmp_path), "runs": os.path.join(out, "runs"), "configs": out, "logs": out}
        return ctx

    def fake_run_lavis(ctx, script, name, cfg):
        model = cfg["model"]
        runs.append((ctx["seed"], name, model.get("alignment_weight"), model.get("pformer_checkpoint"),
                     model.get("pretrained"), model.get("qa_weight")))
        ctx["timings"][name] = 1.0
        return f"/runs/seed{ctx['seed']}/{name}"

    cells_seen = {}
    monkeypatch.setattr(pipeline, "prepare", fake_prepare)
    monkeypatch.setattr(pipeline, "run_lavis", fake_run_lavis)
    monkeypatch.setattr(pipeline, "subset", lambda src, dst, n: dst)
    monkeypatch.setattr(report, "chain_metrics", lambda ctx, chain: {"vqa_acc": chain["w1"] + chain["w2"]})
    monkeypatch.setattr(report, "write_ablation_report",
                        lambda out, cells, seeds, times, scale: cells_seen.update(cells) or {"table": ""})
    pipeline.main(["--ablation", "--seeds", "0,1", "--out", str(tmp_path / "abl")])

    for seed in (0, 1):
        mine = [r for r in runs if r[0] == seed]
        stage0 = [r for r in mine if r[1].endswith("_stage0")]
        stage1 = [r for r in mine if r[1].endswith("_stage1")]
        stage2 = [r for r in mine if r[1].endswith("_stage2")]
        assert sorted(r[5] for r in stage0) == [0.0, 1.0]  # paper stage 0 and stage 0 + QA term
        # one stage-1 run without a teacher, one per teacher with w1 = 10
        assert sorted((r[2], bool(r[3])) for r in stage1) == [(0, False), (10, True), (10, True)]
        assert len(stage2) == 7 and sorted(r[2] for r in stage2) == [0, 0, 0, 100, 100, 100, 100]
        for r in stage2:  # each stage 2 continues from the stage-1 run of its (teacher, w1)
            w1 = int(r[1].split("_w")[1].split("_")[0])
            source = r[4].split("/")[-2]
            assert source.endswith("_stage1") and (w1 == 0) == ("_w0_" in source)
        assert len([r for r in mine if r[1].endswith("_eval_vqa")]) == 7
    assert set(cells_seen) == {(v, w1, w2) for v in ("pformer", "pformer_qa") for w1, w2 in pipeline.GRID}
    assert all(len(v) == 2 for v in cells_seen.values())  # one entry per seed
    assert cells_seen[("pformer_qa", 10, 100)][0]["vqa_acc"] == 110
