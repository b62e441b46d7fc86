"""Video captioning (paper Table 7, VATEX): video_features_caption builder, video_opt_pformer, the video
world, configs, and train.py / evaluate.py on tiny backbones with a tiny stage-0 P-Former as teacher."""
import argparse
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401  (registers models, builders, tasks, runner)
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis_pformer.datasets.video_features import (
    FeatureFileError,
    VideoFeatureCaptionDataset,
    load_clip_features,
    pad_clips,
    select_clips,
)
from lavis_pformer.synthetic.video_world import generate
from lavis_pformer.tiny import SIZES

from helpers import REPO, only_run_dir, run_script

ARCH = "video_opt_pformer"
BUILDER = "video_features_caption"
Q, D, MAX_CLIPS = 4, 1024, 8
OPT_WIDTH = SIZES["opt"]["hidden_size"]
CAPTIONS = ["a red circle moves to the left", "the blue square slides up", "a green triangle goes down"]


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small video world: 12 train, 4 val, 4 test videos of 4-12 clips, 2 captions each."""
    return generate(str(tmp_path_factory.mktemp("video_world")), seed=0, n_train=12, n_val=4, n_test=4,
                    captions_per_video=2)


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    """A tiny stage-0 OPT P-Former (Q = 4), exported as stage 0 does."""
    torch.manual_seed(1)
    stage0 = registry.get_model_class("pformer_opt").from_config(OmegaConf.create(dict(
        bert_model=tiny["bert"], opt_model=tiny["opt"], llm_precision="fp32", num_query_token=Q, embed_dim=16,
        load_pretrained=False)))
    return stage0.export_checkpoint(str(tmp_path_factory.mktemp("stage0_video")))


def model_cfg(tiny, **overrides):
    cfg = OmegaConf.load(registry.get_model_class(ARCH).default_config_path("tiny")).model
    cfg.bert_model, cfg.opt_model = tiny["bert"], tiny["opt"]
    return OmegaConf.merge(cfg, overrides)


def build(tiny, for_training=True, seed=0, **overrides):
    torch.manual_seed(seed)
    return registry.get_model_class(ARCH).from_config(model_cfg(tiny, **overrides), for_training=for_training)


@pytest.fixture(scope="module")
def model(tiny, teacher):
    return build(tiny, pformer_checkpoint=teacher)


def batch(lengths=(3, 8, 5), seed=0, captions=CAPTIONS):
    g = torch.Generator().manual_seed(seed)
    features, mask = pad_clips([torch.randn(n, D, generator=g) for n in lengths])
    return {"clip_features": features, "clip_mask": mask, "text_input": list(captions[: len(lengths)])}


def builder_cfg(world, splits=("train", "val", "test"), gt_dir=None, **extra):
    return OmegaConf.create({"max_clips": MAX_CLIPS, **extra, "build_info": {
        "features": {"storage": world["features"]},
        "annotations": {s: {"storage": world[s]} for s in splits},
        "gt_dir": gt_dir or os.path.join(world["root"], "coco_gt"),
    }})


def build_datasets(cfg):
    return registry.get_builder_class(BUILDER)(cfg).build_datasets()


# --- the video world --------------------------------------------------------------------------------------

def test_video_world_is_deterministic_and_in_vatex_layout(world, tmp_path):
    again = generate(str(tmp_path / "again"), seed=0, n_train=12, n_val=4, n_test=4, captions_per_video=2)
    for split in ("train", "val", "test"):
        records = json.load(open(world[split]))
        assert open(world[split], "rb").read() == open(again[split], "rb").read()
        assert len(records) == {"train": 12, "val": 4, "test": 4}[split]
        for rec in records:
            assert set(rec) == {"videoID", "enCap"} and len(rec["enCap"]) == 2
            assert all(c.endswith(".") and c.split()[0] in ("a", "an", "the") for c in rec["enCap"])
            name = rec["videoID"] + ".npy"
            array = np.load(os.path.join(world["features"], name))
            assert array.dtype == np.float32 and array.shape[1] == D and 4 <= array.shape[0] <= 12
            assert np.array_equal(array, np.load(os.path.join(again["features"], name)))
    other = generate(str(tmp_path / "other"), seed=1, n_train=12, n_val=4, n_test=4, captions_per_video=2)
    assert open(world["train"], "rb").read() != open(other["train"], "rb").read()
    assert len(open(world["sentences"]).read().splitlines()) == 24


def test_video_world_features_carry_the_caption(tmp_path):
    """Without noise, a least-squares readout of the features recovers colour, shape and direction."""
    from lavis_pformer.synthetic.video_world import STRUCTURE, projection

    paths = generate(str(tmp_path / "w"), seed=3, n_train=30, n_val=0, n_test=0, feat_dim=64, noise=0.0)
    matrix = projection(3, 64)
    for rec in json.load(open(paths["train"])):
        clips = np.load(os.path.join(paths["features"], rec["videoID"] + ".npy"))
        structured = np.linalg.lstsq(matrix.T, clips.T, rcond=None)[0].T  # [clips, 32]
        colour = list(json.load(open(paths["world"]))["colours"])[int(structured[0, :STRUCTURE[0][1]].argmax())]
        assert colour in rec["enCap"][0]


# --- feature files, caption files, the builder ------------------------------------------------------------

def _write(path, array=None, raw=None):
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, array)
    return str(path)


FEATURE_CASES = {
    # name: (content, exception, fragment)
    "missing": (None, FileNotFoundError, "does not exist"),
    "unreadable": (b"this is not an npy file", FeatureFileError, "cannot be read"),
    "wrong_ndim": (np.zeros(D, np.float32), FeatureFileError, "dimensions"),
    "wrong_ndim_3d": (np.zeros((2, 3, D), np.float32), FeatureFileError, "dimensions"),
    "wrong_dim": (np.zeros((5, 512), np.float32), FeatureFileError, "width 512"),
    "no_clips": (np.zeros((0, D), np.float32), FeatureFileError, "no clips"),
    "nan": (np.full((3, D), np.nan, np.float32), FeatureFileError, "NaN"),
    "object_array": (np.array([{"a": 1}], dtype=object), FeatureFileError, "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(FEATURE_CASES))
def test_feature_file_errors_name_the_file(tmp_path, case):
    content, exc, fragment = FEATURE_CASES[case]
    path = tmp_path / "vid.npy"
    if isinstance(content, bytes):
        _write(path, raw=content)
    elif content is not None:
        if content.dtype == object:
            np.save(path, content, allow_pickle=True)
        else:
            _write(path, content)
    with pytest.raises(exc) as err:
        load_clip_features(str(path), D)
    assert str(path) in str(err.value) and fragment in str(err.value), str(err.value)


def test_vatex_released_layout_is_accepted(tmp_path):
    array = np.random.rand(1, 7, D).astype(np.float64)
    out = load_clip_features(_write(tmp_path / "v.npy", array), D)
    assert out.shape == (7, D) and out.dtype == np.float32


def test_errors_at_build_and_at_getitem(world, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(world["features"], features)
    cfg = builder_cfg(world, splits=("train",))
    cfg.build_info.features.storage = str(features)
    first = json.load(open(world["train"]))[0]["videoID"]
    os.remove(features / f"{first}.npy")
    with pytest.raises(FileNotFoundError, match=f"{first}.npy"):
        build_datasets(cfg)
    _write(features / f"{first}.npy", np.zeros((4, 32), np.float32))  # wrong width, found at build
    with pytest.raises(FeatureFileError, match="width 32"):
        build_datasets(cfg)
    _write(features / f"{first}.npy", np.zeros((4, D), np.float32))
    last = json.load(open(world["train"]))[-1]["videoID"]
    _write(features / f"{last}.npy", raw=b"\x93NUMPY garbage")  # found when the item is read
    train = build_datasets(cfg)["train"]
    with pytest.raises(FeatureFileError, match=f"{last}.npy"):
        train[len(train) - 1]
    cfg.feat_dim = 512
    with pytest.raises(FeatureFileError, match="feat_dim is 512"):
        build_datasets(cfg)


CAPTION_CASES = {
    "not_json": ("{oops", "not valid JSON"),
    "not_a_list": ({"videoID": "video000001"}, "JSON list"),
    "no_videoID": ([{"enCap": ["a cat."]}], "videoID"),
    "no_enCap": ([{"videoID": "video000001"}], "enCap"),
    "empty_enCap": ([{"videoID": "video000001", "enCap": []}], "enCap"),
    "duplicate": ([{"videoID": "video000001", "enCap": ["a."]}] * 2, "twice"),
}


@pytest.mark.parametrize("case", sorted(CAPTION_CASES))
def test_malformed_caption_file(world, tmp_path, case):
    content, fragment = CAPTION_CASES[case]
    path = tmp_path / "vatex_train.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    cfg = builder_cfg(world, splits=("train",))
    cfg.build_info.annotations.train.storage = str(path)
    with pytest.raises(ValueError, match=fragment) as err:
        build_datasets(cfg)
    if case != "duplicate":
        assert str(path) in str(err.value)


def test_builder_splits_and_coco_ground_truth(world, tmp_path):
    from pycocotools.coco import COCO

    datasets = build_datasets(builder_cfg(world, gt_dir=str(tmp_path / "gt")))
    train, test = datasets["train"], datasets["test"]
    assert len(train) == 12 * 2 and len(test) == 4 and len(datasets["val"]) == 4
    item = train[1]
    assert set(item) == {"clip_features", "text_input", "image_id", "instance_id"}
    assert item["image_id"] == 0 and item["clip_features"].shape[1] == D and item["clip_features"].shape[0] <= MAX_CLIPS
    assert item["text_input"] == json.load(open(world["train"]))[0]["enCap"][1].lower().rstrip(".")
    records = json.load(open(world["test"]))
    assert [test[i]["image_id"] for i in range(4)] == [0, 1, 2, 3]
    assert set(test[0]) == {"clip_features", "image_id", "instance_id"}
    assert os.path.dirname(test.coco_gt_file) == str(tmp_path / "gt")
    gt = COCO(test.coco_gt_file)
    assert sorted(gt.getImgIds()) == [0, 1, 2, 3]
    for i, rec in enumerate(records):
        assert sorted(a["caption"] for a in gt.imgToAnns[i]) == sorted(rec["enCap"])
        assert test.video_ids[i] == rec["videoID"]
    assert datasets["val"].coco_gt_file != test.coco_gt_file
    # building again reuses the same file (content-addressed)
    assert build_datasets(builder_cfg(world, gt_dir=str(tmp_path / "gt")))["test"].coco_gt_file == test.coco_gt_file


def test_clip_selection_and_collater_masks(world, tmp_path):
    assert select_clips(5, 8).tolist() == list(range(5))
    uniform = select_clips(12, 8).tolist()
    assert len(uniform) == 8 and uniform[0] == 0 and uniform[-1] == 11 and uniform == sorted(set(uniform))
    assert select_clips(12, 8, "truncate").tolist() == list(range(8))
    with pytest.raises(ValueError, match="clip_sampling"):
        select_clips(12, 8, "random")

    features = tmp_path / "f"
    features.mkdir()
    videos = []
    for i, n in enumerate((3, 5, 12)):
        _write(features / f"v{i}.npy", np.arange(n * D, dtype=np.float32).reshape(n, D) + 1)
        videos.append((f"v{i}", [f"caption {i}"]))
    ds = VideoFeatureCaptionDataset(lambda c: c, str(features), videos, D, MAX_CLIPS)
    out = ds.collater([ds[i] for i in range(3)])
    assert out["clip_features"].shape == (3, 8, D) and out["clip_mask"].dtype == torch.long
    assert out["clip_mask"].sum(1).tolist() == [3, 5, 8]
    assert (out["clip_features"][0, 3:] == 0).all() and (out["clip_features"][0, :3] != 0).all()
    assert out["text_input"] == ["caption 0", "caption 1", "caption 2"] and out["image_id"].tolist() == [0, 1, 2]
    long_video = np.load(features / "v2.npy")
    torch.testing.assert_close(out["clip_features"][2], torch.from_numpy(long_video[uniform]))
    short = ds.collater([ds[0], ds[1]])  # pads to the batch's longest video, not to max_clips
    assert short["clip_features"].shape == (2, 5, D) and short["clip_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    truncated = VideoFeatureCaptionDataset(lambda c: c, str(features), videos, D, MAX_CLIPS, "truncate")
    torch.testing.assert_close(truncated[2]["clip_features"], torch.from_numpy(long_video[:8]))


# --- the model --------------------------------------------------------------------------------------------

def test_forward_terms_and_shapes(model):
    model.train()
    out = model(batch())
    assert set(out) == {"loss", "loss_lm", "loss_align"} and all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_lm"] + out["loss_align"])
    samples = batch()
    assert model.encode_video(samples["clip_features"], samples["clip_mask"]).shape == (3, Q, 64)
    prompt = model.video_prompt(samples["clip_features"], samples["clip_mask"])
    assert prompt.shape == (3, Q, OPT_WIDTH) == model.teacher_prompt(CAPTIONS).shape


def test_padding_does_not_change_the_prompt(model):
    model.eval()
    samples = batch()
    with torch.no_grad():
        prompt = model.video_prompt(samples["clip_features"], samples["clip_mask"])
        noisy = samples["clip_features"].masked_fill(samples["clip_mask"][..., None] == 0, 123.0)
        torch.testing.assert_close(model.video_prompt(noisy, samples["clip_mask"]), prompt)
        alone = model.video_prompt(samples["clip_features"][:1, :3], samples["clip_mask"][:1, :3])
        torch.testing.assert_close(alone, prompt[:1], rtol=1e-5, atol=1e-5)


def test_alignment_gradient_reaches_connector_and_projection_only(model):
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch())["loss_align"].backward()
    for name in ("opt_proj.weight", "query_tokens", "clip_position", "ln_features.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.Qformer.named_parameters() if "crossattention" in n and n.endswith("weight"))
    for part in (model.opt_model, model.pformer_teacher):
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ln_features", "clip_position", "Qformer", "query_tokens", "opt_proj"}
    model.zero_grad(set_to_none=True)


def test_teacher_reads_the_caption_and_stays_in_eval(model):
    model.train()
    assert not model.pformer_teacher.training
    target = {}
    original = model.teacher_prompt

    def spy(texts):
        target["texts"] = texts
        return original(texts)

    model.teacher_prompt = spy
    try:
        model(batch())
    finally:
        del model.teacher_prompt
    assert target["texts"] == CAPTIONS


def test_generate_beam_search_and_prompt(model):
    model.eval()
    samples = {k: v for k, v in batch().items() if k != "text_input"}
    captions = model.generate(samples, num_beams=2, max_length=5, min_length=1)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert len(model.generate(samples, num_beams=1, max_length=3, use_nucleus_sampling=True, num_captions=2)) == 6
    assert len(model.generate(dict(samples, prompt="a video of"), num_beams=2, max_length=3)) == 3


def test_state_dict_has_neither_llm_nor_teacher(model):
    keys = list(model.state_dict())
    assert not [k for k in keys if k.startswith(("opt_model.", "pformer_teacher."))]
    assert "clip_position" in keys and "opt_proj.weight" in keys
    model.load_state_dict(model.state_dict(), strict=True)


def test_alignment_only_and_weight_checks(tiny, teacher, monkeypatch):
    stage1 = build(tiny, lm_weight=0, alignment_weight=10, pformer_checkpoint=teacher).train()

    def no_llm(*args, **kwargs):
        raise AssertionError("the OPT must not run when lm_weight is 0")

    monkeypatch.setattr(stage1.opt_model, "forward", no_llm)
    out = stage1(batch())
    assert set(out) == {"loss", "loss_align"}
    out["loss"].backward()
    assert stage1.opt_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="nothing to train"):
        build(tiny, lm_weight=0, alignment_weight=0)
    baseline = build(tiny, alignment_weight=0).train()
    assert baseline.pformer_teacher is None and set(baseline(batch())) == {"loss", "loss_lm"}
    evaluation = build(tiny, for_training=False, pformer_checkpoint=teacher)
    assert evaluation.pformer_teacher is None
    with pytest.raises(RuntimeError, match="captioning_pformer"):
        evaluation.train()(batch())
    with pytest.raises(ValueError, match="trailing commas"):
        build(tiny, alignment_weight="100,")
    with pytest.raises(ValueError, match=r"\[B, T, 1024\]"):
        baseline({"clip_features": torch.zeros(2, 3, 512), "text_input": ["a", "b"]})
    with pytest.raises(ValueError, match="max_clips"):
        baseline({"clip_features": torch.zeros(1, MAX_CLIPS + 1, D), "text_input": ["a"]})


def test_wrong_teacher_is_refused(tiny, teacher):
    from lavis_pformer.pformer import PFormerCheckpointError

    with pytest.raises(PFormerCheckpointError, match="num_query_token"):
        build(tiny, num_query_token=Q + 1, pformer_checkpoint=teacher)
    with pytest.raises(ValueError, match="pformer_checkpoint"):
        build(tiny, pformer_checkpoint="")


def test_loss_falls_on_a_fixed_batch(tiny, teacher):
    model = build(tiny, seed=3, pformer_checkpoint=teacher).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    samples, history = batch(), []
    for _ in range(12):
        out = model(samples)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    assert history[-1]["loss_align"] < 0.8 * history[0]["loss_align"], history
    assert history[-1]["loss_lm"] < history[0]["loss_lm"], history


# --- configs ----------------------------------------------------------------------------------------------

VATEX = {  # config: (lm_weight, alignment_weight, load_pretrained)
    "vatex_caption_opt2.7b": (1.0, 0.0, False),  # Table 7 baseline
    "vatex_caption_align_opt2.7b": (1.0, 100.0, False),  # one-stage variant
    "vatex_align_stage1_opt2.7b": (0.0, 100.0, False),  # reference schedule, stage 1: alignment only, w = 100
    "vatex_caption_stage2_opt2.7b": (1.0, 0.0, True),  # reference schedule, stage 2: captioning only
}


@pytest.mark.parametrize("name", sorted(VATEX))
def test_vatex_configs_parse_and_build_on_tiny_backbones(tiny, name):
    lm_weight, alignment_weight, load_pretrained = VATEX[name]
    path = os.path.join(REPO, "projects", "pformer", "train", f"{name}.yaml")
    cfg = Config(argparse.Namespace(cfg_path=path, options=None))
    m, data, run = cfg.model_cfg, cfg.datasets_cfg[BUILDER], cfg.run_cfg
    assert (m.arch, m.model_type, m.feat_dim, m.max_clips, m.num_query_token) == (ARCH, "vatex_opt2.7b", 1024, 32, 32)
    assert (m.opt_model, m.bert_model) == ("facebook/opt-2.7b", "bert-base-uncased")
    assert (m.lm_weight, m.alignment_weight, m.load_pretrained) == (lm_weight, alignment_weight, load_pretrained)
    assert (data.feat_dim, data.max_clips, data.clip_sampling) == (1024, 32, "uniform")
    assert run.task == "captioning_pformer" and run.runner == "runner_pformer"
    assert run.valid_splits == ([] if lm_weight == 0 else ["val"])
    script = os.path.join(REPO, "run_scripts", "pformer", "train", f"{name}.sh")
    assert f"projects/pformer/train/{name}.yaml" in open(script).read() and os.access(script, os.X_OK)
    # the reference's video schedule: 10 epochs at a global batch of 128, prompt "a photo of "
    nproc = int(re.search(r"NPROC=\$\{NPROC:-(\d+)\}", open(script).read()).group(1))
    assert run.max_epoch == 10 and run.batch_size_train * nproc == 128
    assert m.prompt == "a photo of" and data.text_processor.train.prompt == "a photo of "
    header = open(path).read().split("\nmodel:")[0]
    assert "10 epochs" in header and "128" in header
    overrides = dict(bert_model=tiny["bert"], opt_model=tiny["opt"], llm_precision="fp32", load_pretrained=False)
    torch.manual_seed(0)
    model = registry.get_model_class(ARCH).from_config(OmegaConf.merge(m, overrides), for_training=False)
    assert model.query_tokens.shape[1] == 32 and model.clip_position.shape == (1, 32, 1024)
    assert (model.lm_weight, model.alignment_weight) == (lm_weight, alignment_weight)
    if alignment_weight > 0:  # training needs the P-Former: an empty path is an error
        with pytest.raises(ValueError, match="pformer_checkpoint"):
            registry.get_model_class(ARCH).from_config(OmegaConf.merge(m, overrides), for_training=True)


def test_tiny_video_configs_parse():
    tiny_dir = os.path.join(REPO, "projects", "pformer", "tiny")
    names = sorted(n for n in os.listdir(tiny_dir) if n.startswith("video_"))
    assert set(names) >= {"video_align_stage1.yaml", "video_caption.yaml", "video_caption_align.yaml",
                          "video_caption_eval.yaml", "video_caption_stage2.yaml"}
    for name in names:
        cfg = Config(argparse.Namespace(cfg_path=os.path.join(tiny_dir, name), options=None))
        assert cfg.model_cfg.model_type == "tiny" and cfg.model_cfg.num_query_token == Q
        assert cfg.datasets_cfg[BUILDER].build_info.features.storage == "output/tiny/video/features"
        if cfg.model_cfg.alignment_weight > 0 and not cfg.run_cfg.evaluate:
            assert cfg.model_cfg.pformer_checkpoint == "output/tiny/stage0_opt/latest/pformer.pth"


# --- train.py and evaluate.py -----------------------------------------------------------------------------

def run_config(tiny, world, alignment_weight, teacher=None, output_dir="out", test=True, **model):
    return {
        "model": {"arch": ARCH, "model_type": "tiny", "bert_model": tiny["bert"], "opt_model": tiny["opt"],
                  "alignment_weight": alignment_weight, **({"pformer_checkpoint": teacher} if teacher else {}),
                  **model},
        "datasets": {BUILDER: {"feat_dim": D, "max_clips": MAX_CLIPS, "build_info": {
            "features": {"storage": world["features"]},
            "annotations": {"train": {"storage": world["train"]}, "test": {"storage": world["test"]}},
            "gt_dir": "gt"}}},
        "run": {
            "task": "captioning_pformer", "runner": "runner_pformer", "lr_sched": "linear_warmup_cosine_lr",
            "init_lr": 1e-3, "min_lr": 1e-4, "warmup_lr": 1e-5, "warmup_steps": 1, "weight_decay": 0.05,
            "max_epoch": 1, "batch_size_train": 12, "batch_size_eval": 4, "num_workers": 0, "log_freq": 1,
            "max_len": 5, "min_len": 1, "num_beams": 2, "caption_spice": False, "seed": 42,
            "output_dir": output_dir, "amp": False, "evaluate": False, "train_splits": ["train"],
            "valid_splits": [], "test_splits": ["test"] if test else [], "device": "cpu", "world_size": 1,
            "dist_url": "env://", "distributed": True,
        },
    }


METRICS = ("Bleu_4", "CIDEr", "ROUGE_L", "METEOR")


def metrics_of(run_dir, split="test"):
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "evaluate.txt")).read().splitlines()]
    metrics = [line[split] for line in lines if split in line][-1]
    assert all(isinstance(metrics[k], float) and 0 <= metrics[k] for k in METRICS), metrics
    return metrics


@pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need java (pycocoevalcap)")
def test_train_with_and_without_alignment_then_evaluate(tiny, world, teacher, tmp_path):
    """Both runs end with the runner's test phase (captions of every test video; METEOR's Java start-up costs
    ~10-20 s, so the metrics themselves are computed once, by evaluate.py on the aligned checkpoint)."""
    runs = {}
    for name, weight in (("plain", 0.0), ("aligned", 100.0)):
        workdir = tmp_path / name
        workdir.mkdir()
        cfg = run_config(tiny, world, weight, teacher if weight else None)
        cfg["run"]["report_metric"] = False
        run_script("train.py", cfg, str(workdir))
        runs[name] = run_dir = only_run_dir(workdir / "out")
        stats = json.loads(open(os.path.join(run_dir, "log.txt")).read().splitlines()[-1])
        assert {"train_loss", "train_loss_lm"} <= set(stats), stats
        assert ("train_loss_align" in stats) == (weight > 0), stats
        results = json.load(open(os.path.join(run_dir, "result", "test_epoch0.json")))
        assert sorted(r["image_id"] for r in results) == [0, 1, 2, 3]
        assert all(isinstance(r["caption"], str) for r in results)
        checkpoint = torch.load(os.path.join(run_dir, "checkpoint_0.pth"), map_location="cpu", weights_only=False)
        assert checkpoint["model"] and not [k for k in checkpoint["model"]
                                            if k.startswith(("opt_model.", "pformer_teacher."))]

    # evaluate.py: no P-Former needed (alignment_weight 100 from the tiny yaml, no pformer_checkpoint)
    eval_cfg = run_config(tiny, world, 100.0, output_dir="eval", load_finetuned=True,
                          finetuned=os.path.join(runs["aligned"], "checkpoint_0.pth"))
    eval_cfg["run"]["evaluate"] = True
    del eval_cfg["datasets"][BUILDER]["build_info"]["annotations"]["train"]
    proc = run_script("evaluate.py", eval_cfg, str(tmp_path / "aligned"))
    run_dir = only_run_dir(tmp_path / "aligned" / "eval")
    metrics = metrics_of(run_dir)
    for key in METRICS:
        assert f"| test | {key} | {metrics[key]:.4f} |" in proc.stdout
    # the same captions as the training run's own test phase: the checkpoint holds the whole trained model
    def captions(path):
        return {r["image_id"]: r["caption"] for r in json.load(open(path))}

    trained = captions(os.path.join(runs["aligned"], "result", "test_epoch0.json"))
    assert captions(os.path.join(run_dir, "result", "test_epochbest.json")) == trained
