"""Paper Table 7 in miniature at smoke scale: the video world's frozen LM (lavis_pformer.demo.video_backbones) and
the table's train.py / evaluate.py runs (lavis_pformer.demo.video_table)."""
import glob
import json
import os
import shutil

import pytest

from lavis_pformer.demo import frozen_backbones, video_backbones as vb, video_table as vt
from lavis_pformer.demo.scheduler import run_jobs
from lavis_pformer.synthetic import video_world

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need java (pycocoevalcap)")


def test_lm_text_is_unpaired_world_captions_with_context_segments():
    known = {vb.caption_text(c) for c in video_world.all_captions()}
    assert len(known) == 6 * 3 * 4 * len(video_world.TEMPLATES)
    lines = vb.corpus_lines(0, 400, 0.5)
    assert vb.corpus_lines(0, 400, 0.5) == lines and vb.corpus_lines(1, 400, 0.5) != lines
    with_context = [line for line in lines if "</s>" in line]
    assert 0.4 < len(with_context) / len(lines) < 0.6
    for line in lines:
        segments = line.split("</s>")
        assert len(segments) <= 2 and len(set(segments)) == 1 and segments[0] in known, line
    # no video of any split is paired with this text: it comes from the world's own text stream
    assert video_world.unpaired_captions(0, 50) == video_world.unpaired_captions(0, 80)[:50]


def test_content_accuracy_needs_colour_shape_and_direction():
    videos = [{"videoID": "a", "enCap": ["a red circle moves to the left."]},
              {"videoID": "b", "enCap": ["the blue square slides up."]},
              {"videoID": "c", "enCap": ["an orange triangle goes down."]}]
    right = [{"image_id": 0, "caption": "the red circle is moving to the left"},
             {"image_id": 1, "caption": "a blue square goes up"},
             {"image_id": 2, "caption": "an orange triangle moves down"}]
    assert vt.content_accuracy(right, videos) == 1.0
    wrong = [dict(right[0], caption="a red circle moves to the right"),  # direction
             dict(right[1], caption="a blue red square goes up"),  # two colours
             dict(right[2], caption="an orange square moves down")]  # shape
    assert vt.content_accuracy(wrong, videos) == 0.0
    assert vt.content_accuracy(right[:1], videos) == pytest.approx(1 / 3)  # a video without a caption counts wrong


def test_committed_video_lm_matches_its_manifest():
    manifest = vb.verify(vb.COMMITTED, vb.RECIPE)
    assert manifest["recipe"]["seed"] == 0 and manifest["format"] == vb.FORMAT
    assert set(manifest["files"]) >= {"lm/config.json", "lm/pytorch_model.bin", "lm/vocab.json", "lm/merges.txt"}
    assert {"copy_exact", "samples_in_world", "lm_parameters"} <= set(manifest["quality"])
    assert set(manifest["build_time_s"]) >= {"lm", "total"}
    with pytest.raises(frozen_backbones.BackbonesError, match="demo-video-backbones-v1"):
        vb.verify(frozen_backbones.COMMITTED)  # the image demo's backbones are not a video LM


@pytest.fixture(scope="module")
def smoke_table(tmp_path_factory):
    """One world's Table 7 at smoke scale: the LM built by its recipe, then every run of the table."""
    out = str(tmp_path_factory.mktemp("table7"))
    ctx = vt.prepare(out, world_seed=0, scale="smoke", log_fn=lambda msg: None)
    jobs = vt.table7_jobs(ctx)
    times = run_jobs(jobs, parallel=2, threads=1)
    return ctx, jobs, times


def test_lm_recipe_builds_verifies_repeats_and_refuses_a_tampered_copy(smoke_table, tmp_path):
    ctx, _, _ = smoke_table
    folder = os.path.dirname(ctx["lm"])
    manifest = vb.verify(folder, vb.recipe_for(0, vb.SMOKE_RECIPE))
    assert manifest == ctx["lm_manifest"] and 0 <= manifest["quality"]["copy_exact"] <= 1
    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

    assert OPTForCausalLM.from_pretrained(ctx["lm"]).config.num_hidden_layers == vb.SMOKE_RECIPE["lm"]["layers"]
    again = vb.build(str(tmp_path / "again"), vb.recipe_for(0, vb.SMOKE_RECIPE), log=lambda msg: None)
    assert again["files"] == manifest["files"]  # the seeded recipe gives the same bytes
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    with open(copy / "lm" / "pytorch_model.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(frozen_backbones.BackbonesError, match=r"changed \['lm/pytorch_model.bin'\].*video_backbones"):
        vb.verify(str(copy))
    with pytest.raises(frozen_backbones.BackbonesError, match="another recipe"):
        vb.verify(folder, vb.recipe_for(1, vb.SMOKE_RECIPE))


def _log_stats(ctx, name):
    with open(os.path.join(vt.run_dir(ctx, name), "log.txt")) as f:
        return [json.loads(line) for line in f if line.startswith("{\"train")]


@needs_java
def test_table7_runs_end_to_end_and_scores_with_the_caption_evaluator(smoke_table):
    from lavis_pformer.caption_eval import caption_metrics

    ctx, jobs, times = smoke_table
    runs = vt.table7_runs()
    assert set(times) == {j.name for j in jobs} and all(os.path.exists(j.args[-1]) for j in jobs)
    # the same budget: the baseline's epochs = the aligned arm's alignment epochs + captioning epochs
    cap = ctx["scale"]["caption"]
    itg, = runs["itg"]["train"]
    align, itg_align = runs["itg_align"]["train"]
    assert len(_log_stats(ctx, itg)) == cap["epochs"]
    assert len(_log_stats(ctx, align)) + len(_log_stats(ctx, itg_align)) == cap["epochs"]
    assert all("train_loss_align" in s and "train_loss_lm" not in s for s in _log_stats(ctx, align))
    assert all("train_loss_lm" in s and "train_loss_align" not in s for s in _log_stats(ctx, itg))
    assert all("train_loss_align" not in s for s in _log_stats(ctx, itg_align))
    with open(os.path.join(ctx["configs"], f"{itg_align}.yaml")) as f:
        assert "video_align_stage1/latest/checkpoint_last.pth" in f.read()  # captioning starts from the alignment

    metrics = vt.table7_metrics(ctx)
    assert set(metrics) == set(vt.ARMS)
    for arm in vt.ARMS:
        assert set(metrics[arm]) == {"val", "test"}
        for split, m in metrics[arm].items():
            assert all(isinstance(m[k], float) and m[k] >= 0 for k in vt.METRICS), m
            assert 0 <= m["content_accuracy"] <= 1 and 1 <= m["distinct"] <= ctx["scale"]["world"][f"n_{split}"]
    # the numbers are LAVIS's caption metrics of the written captions against all captions of each video
    folder = os.path.realpath(vt.run_dir(ctx, runs["itg_align"]["eval"]))
    result, = [p for p in glob.glob(os.path.join(folder, "result", "test_epoch*.json")) if "_rank" not in p]
    gt, = glob.glob(os.path.join(ctx["data"], "video_coco_gt", "vatex_test_*_coco_gt.json"))
    assert caption_metrics(gt, result) == {k: v for k, v in metrics["itg_align"]["test"].items()
                                           if k not in ("content_accuracy", "distinct")}
    table = vt.table_markdown(metrics)
    assert f"{100 * metrics['itg']['test']['CIDEr']:.1f}" in table.splitlines()[2]

    ceiling = vt.teacher_ceiling(ctx, "val")
    assert all(isinstance(ceiling[k], float) for k in vt.METRICS) and 0 <= ceiling["content_accuracy"] <= 1
