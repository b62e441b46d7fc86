"""The bad-input matrix (docs/reliability.md): each case names the problem and the fix, and nothing a
previous run wrote is lost. Cases that other test files already cover are listed in the docs table, not
repeated here.
"""
import json
import logging
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from conftest import build_model, tiny_stage0_overrides
from runner_helpers import build_runner, make_teacher, stage0_config, stage2_config

# ---------------------------------------------------------------------------------------------------------
# Text edge cases through the models of stages 0, 1 and 2.

LONG_WORDS = ("a red circle at the top left " * 400)[:10_000]
TEXTS = {
    "empty": "",
    "whitespace": " \t\n ",
    "10k_chars_of_words": LONG_WORDS,
    "10k_chars_one_word": "x" * 10_000,
    "non_ascii_emoji": "a red 🐶 café naïve 日本語 circle ✨ at the top left",
}
STAGE0 = ("pformer_opt", "pformer_t5")
IMAGE_MODELS = ("blip2_qformer_pformer", "blip2_opt_pformer", "blip2_t5_pformer")
VIT = dict(patch_size=8, embed_dim=32, depth=1, num_heads=4)


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    """LAVIS's Blip2Qformer.forward calls dist.get_rank(): a 1-rank gloo group, as train.py starts."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return {llm: make_teacher(tiny, d / f"{llm}.pth", llm) for llm in ("opt", "t5")}


@pytest.fixture(scope="module")
def models(tiny, teachers):
    from lavis.common.registry import registry

    built = {}
    torch.manual_seed(0)
    built["pformer_opt"] = build_model("pformer_opt", "pformer_opt2.7b", **tiny_stage0_overrides(tiny, "opt"))
    built["pformer_t5"] = build_model("pformer_t5", "pformer_flant5xl", **tiny_stage0_overrides(tiny, "t5"))
    common = dict(bert_model=tiny["bert"], vit_model="custom_vit", vit_config=VIT, image_size=32, vit_precision="fp32",
                  llm_precision="fp32", num_query_token=4, max_txt_len=24, load_pretrained=False)
    extra = {"blip2_qformer_pformer": dict(pformer_checkpoint=teachers["opt"]),
             "blip2_opt_pformer": dict(pformer_checkpoint=teachers["opt"], opt_model=tiny["opt"]),
             "blip2_t5_pformer": dict(pformer_checkpoint=teachers["t5"], t5_model=tiny["t5"])}
    for name, cfg in extra.items():
        built[name] = registry.get_model_class(name).from_config(OmegaConf.create({**common, **cfg}), for_training=True)
    return built


def _step(model, texts):
    samples = {"text_input": list(texts)}
    if hasattr(model, "visual_encoder"):
        samples["image"] = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    out = model(samples)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("name", STAGE0 + IMAGE_MODELS)
def test_edge_case_captions_give_finite_losses_and_gradients(models, name):
    """Raw and blip_caption-processed: empty, blank, 10,000 characters, non-ASCII and emoji captions."""
    from lavis.processors.blip_processors import BlipCaptionProcessor

    raw = list(TEXTS.values())
    processed = [BlipCaptionProcessor(max_words=50)(t) for t in raw]
    mixed = raw + [t for t in dict.fromkeys(processed) if t not in raw]
    for texts in (mixed, ["", "  "]):  # a mixed batch; a batch of blank captions only
        out, grads = _step(models[name], texts)
        for term, value in out.items():
            assert torch.isfinite(value), (name, term, float(value))
        assert grads and all(torch.isfinite(g).all() for g in grads), name


def test_long_captions_are_cut_at_max_txt_len(models):
    stage0 = models["pformer_opt"]
    assert stage0.tokenize([LONG_WORDS, "x" * 10_000]).input_ids.shape[1] == stage0.max_txt_len
    embeds, _, _ = stage0.opt_inputs(torch.zeros(1, 4, 48), [LONG_WORDS + "\n"])
    assert embeds.shape[1] == 4 + stage0.max_txt_len
    stage2 = models["blip2_opt_pformer"]
    assert stage2.teacher_prompt([LONG_WORDS, TEXTS["non_ascii_emoji"]]).shape == (2, 4, 48)


# ---------------------------------------------------------------------------------------------------------
# Data-level problems: counted and skipped within a tolerance, clear errors past it.


@pytest.fixture
def world(tiny, tmp_path):
    """A private copy of the tiny world, safe to damage."""
    return shutil.copytree(tiny["world"], str(tmp_path / "world"))


def _caption_builder(world, **build_info):
    from lavis.common.registry import registry

    cfg = {"build_info": {"images": {"storage": world},
                          "annotations": {"train": {"storage": f"{world}/captions_train.json"}}, **build_info}}
    return registry.get_builder_class("local_caption")(OmegaConf.create(cfg))


def _records(world):
    return json.load(open(f"{world}/captions_train.json"))


def _damage(world, records, corrupt=1, missing=5):
    bad, gone = (os.path.join(world, records[i]["image"]) for i in (corrupt, missing))
    with open(bad, "wb") as f:
        f.write(b"GIF89a not really")
    os.remove(gone)
    return bad, gone


def test_unreadable_training_images_are_skipped_within_max_bad_images(world, caplog):
    records = _records(world)
    bad, gone = _damage(world, records)
    ds = _caption_builder(world, max_bad_images=2).build_datasets()["train"]
    with caplog.at_level(logging.WARNING):
        item = ds[1]  # corrupt: replaced by the next readable record
        assert item["text_input"] == ds.text_processor(records[2]["caption"])
        assert ds[5]["text_input"] == ds.text_processor(records[6]["caption"])  # missing
    assert re.search(rf"skipping unreadable training image 1 of at most 2 .*{re.escape(bad)} cannot be read", caplog.text)
    assert re.search(rf"skipping unreadable training image 2 of at most 2 .*{re.escape(gone)} does not exist", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same images in the next epoch: skipped again, not recounted
        batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=ds.collater)))
    assert batch["image"].shape == (8, 3, 32, 32) and "skipping" not in caplog.text
    assert len(ds.bad_images) == 2


def test_unreadable_image_past_max_bad_images_names_file_count_and_fix(world):
    records = _records(world)
    bad, gone = _damage(world, records)
    ds = _caption_builder(world, max_bad_images=1).build_datasets()["train"]
    ds[1]
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(gone)} does not exist.*2 unreadable image\(s\).*"
                                                r"max_bad_images is 1: raise it"):
        ds[5]
    default = _caption_builder(world).build_datasets()["train"]  # default 0: the first one is an error
    with pytest.raises(OSError, match=rf"{re.escape(bad)} cannot be read as an image.*max_bad_images is 0"):
        default[1]


@pytest.mark.parametrize("value", [-1, "3,", 1.5])
def test_max_bad_images_must_be_a_count(world, value):
    with pytest.raises(ValueError, match=r"build_info\.max_bad_images must be an integer >= 0"):
        _caption_builder(world, max_bad_images=value).build_datasets()


def test_blank_captions_are_kept_and_counted_non_string_captions_are_errors(world, caplog):
    records = _records(world)
    records[0]["caption"], records[5]["caption"] = "", "   "
    json.dump(records, open(f"{world}/captions_train.json", "w"))
    with caplog.at_level(logging.WARNING):
        ds = _caption_builder(world).build_datasets()["train"]
    assert len(ds) == len(records) and ds[0]["text_input"] == ""
    assert "2 of 64 captions are empty or blank" in caplog.text
    records[7]["caption"] = None
    json.dump(records, open(f"{world}/captions_train.json", "w"))
    with pytest.raises(ValueError, match=r"entry 7: caption None is not a string"):
        _caption_builder(world).build_datasets()


def test_one_bad_line_in_a_large_text_corpus_is_skipped_within_max_bad_lines(tmp_path, caplog):
    from lavis.common.registry import registry

    corpus = tmp_path / "corpus.txt"
    lines = [f"a red circle number {i}".encode() for i in range(5000)]
    lines[1234] = b"caf\xe9 latin-1, not utf-8"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    build = lambda n: registry.get_builder_class("sentence_corpus")(OmegaConf.create(  # noqa: E731
        {"build_info": {"max_bad_lines": n, "annotations": {"train": {"storage": str(corpus)}}}})).build_datasets()
    with pytest.raises(ValueError, match=r"corpus\.txt, line 1235: not UTF-8.*raise build_info\.max_bad_lines \(now 0\)"):
        build(0)
    with caplog.at_level(logging.WARNING):
        assert len(build(1)["train"]) == 4999
    assert f"skipped 1 bad lines in {corpus} (max_bad_lines=1)" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Run-level: train.py's build (in this process) fails with the problem and the fix, before touching the
# folders of an earlier run.


@pytest.fixture
def earlier_run(tmp_path):
    """out/<job>/checkpoint_0.pth, result/..., and out/latest -> <job>, as an earlier run leaves them.

    Returns a function that asserts all of it is still there, unchanged."""
    job = tmp_path / "out" / "20250101000000"
    (job / "result").mkdir(parents=True)
    torch.save({"model": {}, "epoch": 0}, job / "checkpoint_0.pth")
    (job / "result" / "test_vqa_result.json").write_text("[]")
    os.symlink(job.name, tmp_path / "out" / "latest")

    def snapshot():
        files = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
        return files, os.readlink(tmp_path / "out" / "latest"), sorted(os.listdir(tmp_path / "out"))

    before = snapshot()

    def unchanged():
        assert snapshot() == before

    return unchanged


def _truncated_copy(path, out):
    data = open(path, "rb").read()
    out.write_bytes(data[: len(data) // 2])
    return str(out)


BAD_RUNS = {
    # case: (config(tiny, teachers, tmp_path), options(tmp_path), exception, message fragments)
    "alignment_weight_string": (
        lambda t, te, d: stage2_config(t, te["opt"], "out"), lambda d: ["model.alignment_weight=10,"],
        ValueError, ["model.alignment_weight must be a number, got '10,'", "trailing commas"]),
    "pformer_checkpoint_truncated": (
        lambda t, te, d: stage2_config(t, _truncated_copy(te["opt"], d / "half.pth"), "out"), lambda d: [],
        ValueError, ["half.pth", "cannot be read", "model.pformer_checkpoint"]),
    "pformer_checkpoint_other_llm": (
        lambda t, te, d: stage2_config(t, te["t5"], "out"), lambda d: [],
        ValueError, ["llm_hidden_size: the checkpoint has 40, the model expects 48", "Train a P-Former for this LLM"]),
    "corpus_missing": (
        lambda t, te, d: stage0_config(t, "out", corpus=str(d / "nope.txt")), lambda d: [],
        FileNotFoundError, ["nope.txt does not exist", "build_info.annotations.<split>.storage"]),
    "corpus_empty": (
        lambda t, te, d: stage0_config(t, "out", corpus=str(d / "empty.txt")), lambda d: [],
        ValueError, ["empty.txt contains no sentences", "Fill the file or remove it"]),
    "output_dir_under_a_file": (
        lambda t, te, d: stage0_config(t, "out"), lambda d: [f"run.output_dir={d / 'a_file'}/sub"],
        PermissionError, ["a_file is a file, not a folder", "set run.output_dir to a writable folder"]),
    "resume_checkpoint_missing": (
        lambda t, te, d: stage0_config(t, "out"), lambda d: ["run.resume_ckpt_path=out/latest/checkpoint_9.pth"],
        FileNotFoundError, ["run.resume_ckpt_path: no file at out/latest/checkpoint_9.pth", "checkpoint_last.pth"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_config_fails_clearly_and_keeps_earlier_outputs(tiny, teachers, tmp_path, monkeypatch, earlier_run,
                                                                case):
    config, options, exc, fragments = BAD_RUNS[case]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(exc) as err:
        build_runner(config(tiny, teachers, tmp_path), tmp_path, monkeypatch, options(tmp_path))
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    earlier_run()


# ---------------------------------------------------------------------------------------------------------
# Non-finite loss, end to end.


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from lavis_pformer.pformer import PFormer
    from lavis_pformer.tasks import NonFiniteLossError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(open(tiny["sentences"]).readlines()[:64]))
    runner = build_runner(stage0_config(tiny, "out", corpus=str(corpus), max_epoch=2, batch_size_train=32),
                          tmp_path, monkeypatch)
    model = runner._model
    forward = model.forward

    def nan_in_epoch_1(samples):
        out = forward(samples)
        if samples["epoch"] == 1 and samples["iters"] == 1:  # e.g. an overflow in the LLM
            out["loss_lm"] = out["loss_lm"] * float("nan")
            out["loss"] = out["loss_lm"] + out["loss_c"] + out["loss_vq"]
        return out

    monkeypatch.setattr(model, "forward", nan_in_epoch_1)
    with pytest.raises(NonFiniteLossError) as err:
        runner.train()
    message = str(err.value)
    assert re.search(r"non-finite training loss at epoch 1 iteration 1: \{'loss': nan, 'loss_lm': nan, "
                     r"'loss_c': [-\d.e]+, 'loss_vq': [-\d.e]+\}; batch ids: \['\d+'", message)
    assert "run.resume_ckpt_path=<run folder>/checkpoint_last.pth" in message and "run.init_lr" in message
    run_dir = str(runner.output_dir)
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pth")) == \
        ["checkpoint_0.pth", "checkpoint_0.rng.pth", "checkpoint_last.pth", "pformer.pth"]
    last = torch.load(os.path.join(run_dir, "checkpoint_last.pth"), map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert PFormer.load(os.path.join(run_dir, "pformer.pth"), num_query_token=4)
