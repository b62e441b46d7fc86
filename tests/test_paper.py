"""`make paper`: the tables as data, the plan of runs, the scores and the directions, and the whole pipeline at
smoke scale with real runs and LAVIS's evaluators."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from lavis_pformer.demo.paper import plan, scoring, tables

from helpers import REPO


SMOKE_TABLES = "default,table5,table7"

def test_direction_words():
    assert scoring.direction([0.10, 0.20, 0.15]) == scoring.AGREES
    assert scoring.direction([-0.10, -0.20, -0.15]) == scoring.OPPOSITE
    assert scoring.direction([0.30, -0.01, 0.20]) == scoring.WITHIN  # one world the other way
    assert scoring.direction([0.01, 0.30, 0.01]) == scoring.WITHIN  # all positive, mean within one std
    assert scoring.direction([None, 0.2]) == scoring.AGREES  # a world without both numbers is left out
    assert scoring.direction([None]) == scoring.MISSING
    assert scoring.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and scoring.mean_std([None]) == (None, None)


def test_claim_result_compares_the_two_arms_world_by_world():
    claim = tables.TABLES[0].claims[0]
    per_world = {0: {claim.arm.name: {"vqa_test": 0.5}, claim.versus.name: {"vqa_test": 0.4}},
                 1: {claim.arm.name: {"vqa_test": 0.3}, claim.versus.name: {"vqa_test": 0.45}}}
    result = scoring.claim_result(claim, per_world)
    assert result["per_world"][0]["difference"] == pytest.approx(0.1)
    assert result["per_world"][1]["difference"] == pytest.approx(-0.15)
    assert result["difference_mean"] == pytest.approx(-0.025) and result["direction"] == scoring.WITHIN


def test_tables_are_consistent():
    assert len(set(tables.TABLE_KEYS)) == len(tables.TABLES)
    for table in tables.TABLES:
        for claim in table.claims:
            assert claim.arm in table.arms and claim.versus in table.arms, claim.label
            assert claim.metric in dict(table.metrics), claim.label
    names = [a.name for a in tables.arms_of(tables.TABLES)]
    assert len(names) == len(set(names))
    assert {t.key for t in tables.select(["default"])} == {"table1", "table2", "table6", "ood"}
    assert tables.select(["all"]) == tables.TABLES
    with pytest.raises(ValueError, match="unknown tables"):
        tables.select(["table9"])
    assert tables.BASELINE.teacher is None and tables.PFORMER_FT.pretrained == tables.PFORMER


def test_question_pair_and_held_out_pairs_named():
    assert scoring.question_pair({"question": "what color is the circle?", "answer": ["red"]}) == ("red", "circle")
    assert scoring.question_pair({"question": "what shape is the blue object?", "answer": "square"}) == \
        ("blue", "square")
    assert scoring.question_pair({"question": "how many objects are there?", "answer": "2"}) is None
    held = {("red", "circle")}
    references = {1: "a red circle at the top left and a blue square at the top right.", 2: "a green square at the top left."}
    assert scoring.held_pairs_named([{"image_id": 1, "caption": "a red circle at the top left."},
                                     {"image_id": 2, "caption": "a red circle at the top left."}],
                                    references, held) == 1.0
    assert scoring.held_pairs_named([{"image_id": 1, "caption": "a red square at the top left."}], references,
                                    held) == 0.0


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    scale = plan.paper_scale("smoke")
    return plan.world_context(str(tmp_path_factory.mktemp("paper")), scale, world_seed=3, llms=("opt", "t5"))


def test_backbones_folder_builds_what_is_missing(tmp_path):
    from lavis_pformer.demo import frozen_backbones as fb

    scale = plan.paper_scale("cpu")
    # world seed 0 is the committed recipe, with or without its T5 part
    assert plan.backbones_folder(str(tmp_path), plan.world_recipe(scale, 0)) == (fb.COMMITTED, None)
    assert plan.backbones_folder(str(tmp_path), plan.world_recipe(scale, 0, ("opt", "t5"))) == (fb.COMMITTED, None)
    without_t5, with_t5 = plan.world_recipe(scale, 1), plan.world_recipe(scale, 1, ("opt", "t5"))
    assert "t5" not in without_t5 and with_t5["t5"] == fb.RECIPE["t5"] and with_t5["seed"] == 1
    folder = str(tmp_path / "backbones")
    assert plan.backbones_folder(str(tmp_path), with_t5) == (folder, (with_t5, None))  # nothing there: all parts
    os.makedirs(folder)
    with open(os.path.join(folder, fb.MANIFEST), "w") as f:
        json.dump({"recipe": without_t5}, f)
    assert plan.backbones_folder(str(tmp_path), without_t5) == (folder, None)  # reused
    assert plan.backbones_folder(str(tmp_path), with_t5) == (folder, (with_t5, ["t5"]))  # only the T5 added
    with open(os.path.join(folder, fb.MANIFEST), "w") as f:
        json.dump({"recipe": dict(without_t5, lm=dict(without_t5["lm"], steps=1))}, f)
    # another OPT recipe: the OPT and the T5 built anew, the ViT and BERT kept (frozen_backbones --parts)
    assert plan.backbones_folder(str(tmp_path), with_t5) == (folder, (with_t5, ["lm", "t5"]))
    with open(os.path.join(folder, fb.MANIFEST), "w") as f:
        json.dump({"recipe": dict(without_t5, seed=2)}, f)
    assert plan.backbones_folder(str(tmp_path), with_t5) == (folder, (with_t5, None))  # another world: all parts
    ctx = {"out": str(tmp_path), "logs": str(tmp_path), "backbones_dir": folder, "build_backbones": (with_t5, ["t5"])}
    job = plan.backbones_job(ctx)
    assert job.args[-2:] == ["--parts", "t5"] and json.load(open(tmp_path / "backbones_recipe.json")) == with_t5


def test_plan_runs_each_run_once_and_chains_them(smoke_world):
    ctx = smoke_world
    chosen = tuple(t for t in tables.TABLES if t.key != "table7")
    jobs, needs = plan.plan_world(ctx, chosen)
    by_name = {j.name.split("/", 1)[1]: j for j in jobs}
    assert len(by_name) == len(jobs) and all(j.name.startswith("seed3/") for j in jobs)
    assert "backbones" in by_name  # the smoke recipe is not the committed one: built by a job
    for job in jobs:
        assert set(job.after) <= {j.name for j in jobs}
    cfg = {n: yaml.safe_load(open(j.args[-1])) for n, j in by_name.items() if n != "backbones"}
    teachers = tables.teachers_of(tables.arms_of(chosen))
    assert sorted(n for n in cfg if n.startswith("stage0_")) == sorted(plan.stage0_name(t) for t in teachers)
    # one stage 1 without a teacher serves the OPT and T5 baselines and the fine-tuned baseline
    assert "stage1_w0" in needs[tables.BASELINE.name] & needs[tables.T5_BASELINE.name] & needs[tables.BASELINE_FT.name]
    assert cfg["stage0_t5_sent32k"]["model"]["arch"] == "pformer_t5"
    assert cfg["stage0_t5_sent32k"]["model"]["t5_model"].endswith("t5")
    assert cfg["t5_w10_100_sent32k_stage2"]["model"]["arch"] == "blip2_t5_pformer"
    ft = cfg["opt_w10_100_sent32k_ft"]["model"]
    assert ft["alignment_weight"] == 0 and not ft["pformer_checkpoint"]  # fine-tuning: LM loss only
    assert os.sep.join(ft["pretrained"].split(os.sep)[-3:-1]) == "opt_w10_100_sent32k_stage2/latest"
    for name, c in cfg.items():
        if name.endswith("_eval_vqa") or name.endswith("_eval_caption"):
            assert c["run"]["test_splits"] == ["val", "test", "test_ood"], name
    # every teacher reads the same number of lines; "paired" only the paired captions, "sent4k" fewer lines
    lines = ctx["scale"]["stage0"]["lines"]
    texts = {}
    for t in teachers:
        path = cfg[plan.stage0_name(t)]["datasets"]["sentence_corpus"]["build_info"]["annotations"]["train"]["storage"]
        texts[t[1]] = open(path).read().splitlines()
        assert len(texts[t[1]]) == lines
    paired = {r["caption"] for r in json.load(open(os.path.join(ctx["world"], "captions_train.json")))}
    assert set(texts["paired"]) <= paired
    assert len(set(texts["sent4k"])) < len(set(texts["sent32k"]))


def _paper(out, *extra):
    return subprocess.run([sys.executable, "-m", "lavis_pformer.demo.paper", "--scale", "smoke", "--out", str(out),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=1800)


def test_make_paper_at_smoke_scale_writes_every_table_with_evaluator_numbers(tmp_path):
    """One world, every table of the issue's list (Table 4's grid is ``make ablation``'s, tested with the demo): real
    runs through train.py / evaluate.py, LAVIS's evaluators, the report."""
    proc = _paper(tmp_path, "--worlds", "5", "--tables", SMOKE_TABLES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed"] == [] and results["worlds"] == [5]
    ran = tables.select(SMOKE_TABLES.split(","))
    assert {t.key for t in ran} == set(tables.TABLE_KEYS) - {"table4"} == set(results["tables"])
    for table in ran:
        got = results["tables"][table.key]
        assert set(got["cells"]) == {a.name for a in table.arms}, table.key
        for arm in table.arms:
            for metric, _ in table.metrics:
                if getattr(arm, "finetune", False) and metric.startswith("vqa"):
                    continue  # no VQA after caption fine-tuning
                value = got["cells"][arm.name][metric]["per_world"]["5"]
                assert isinstance(value, float) and 0.0 <= value <= (10.0 if "cider" in metric else 1.0), \
                    (table.key, arm.name, metric)
        for claim in got["claims"]:
            assert claim["direction"] in (scoring.AGREES, scoring.WITHIN, scoring.OPPOSITE), claim["label"]
    world = results["per_world"]["5"]
    # the caption metrics come from LAVIS's COCO scorers and the world's own captions, on the three splits
    assert {"cider_val", "cider_test", "cider_test_ood", "bleu4_test", "cap_obj_test_ood"} <= set(world["opt_w0_0"])
    teachers = tables.teachers_of(tables.arms_of(ran))
    assert len(results["ceilings"]) == 1 + len(teachers) + 1  # the text ceilings of OPT and T5, every teacher
    for ceiling in results["ceilings"].values():
        assert set(ceiling["per_world"]["5"]) == {"test", "test_ood"}
        for split in ("test", "test_ood"):
            assert 0.0 <= ceiling["per_world"]["5"][split]["overall_excl_yesno"] <= 1.0
    t5_teacher = results["ceilings"]["T5 teacher: " + tables.CORPORA["sent32k"]["label"]]
    assert t5_teacher["arm"] == tables.T5_PFORMER.name
    # Table 5 ran on the world's own T5, built into its backbones with the OPT, ViT and BERT
    manifest = json.loads((tmp_path / "seed5" / "backbones" / "manifest.json").read_text())
    assert manifest["recipe"]["seed"] == 5 and "t5/pytorch_model.bin" in manifest["files"]
    stage2 = yaml.safe_load(open(tmp_path / "seed5" / "configs" / "t5_w10_100_sent32k_stage2.yaml"))
    assert stage2["model"]["t5_model"] == str(tmp_path / "seed5" / "backbones" / "t5")
    # Table 7: LAVIS's caption metrics of both video arms, its teacher ceiling and alignment levels
    video = results["video"]["5"]
    for split in ("val", "test"):
        ceiling = video["teacher_ceiling"][split]
        assert {"CIDEr", "Bleu_4", "ROUGE_L", "content_accuracy"} <= set(ceiling)
    assert set(video["alignment_levels"]) == {"mean_prompt", "video_mean_prompt", "reached"}
    assert all(isinstance(v, float) for v in video["alignment_levels"].values())
    text = (tmp_path / "results.md").read_text()
    assert "## Directions" in text and "## Teacher ceilings" in text and "Wall time" in text
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["costs"]) == {t.key for t in ran}
    # the report alone rebuilds the same results from the runs
    again = _paper(tmp_path, "--worlds", "5", "--tables", SMOKE_TABLES, "--report-only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text()) == results
