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
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_pformer.tiny import SIZES

from helpers import (
    build_model,
    build_runner,
    make_teacher,
    run_script,
    stage0_config,
    stage2_config,
    tiny_stage0_overrides,
)

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
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)
VIT = SIZES["vit"]


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
    width = SIZES["opt"]["hidden_size"]
    embeds, _, _ = stage0.opt_inputs(torch.zeros(1, 4, width), [LONG_WORDS + "\n"])
    assert embeds.shape[1] == 4 + stage0.max_txt_len
    stage2 = models["blip2_opt_pformer"]
    assert stage2.teacher_prompt([LONG_WORDS, TEXTS["non_ascii_emoji"]]).shape == (2, 4, width)


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
    """Images not checked at build (check_images: false, or a split too large for auto) fail when read."""
    records = _records(world)
    bad, gone = _damage(world, records)
    ds = _caption_builder(world, max_bad_images=1, check_images=False).build_datasets()["train"]
    ds[1]
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(gone)} does not exist.*2 unreadable image\(s\).*"
                                                r"max_bad_images is 1: raise it"):
        ds[5]
    default = _caption_builder(world, check_images=False).build_datasets()["train"]  # max_bad_images 0: any
    with pytest.raises(OSError, match=rf"{re.escape(bad)} cannot be read as an image.*max_bad_images is 0"):
        default[1]


def test_images_are_checked_before_the_first_step(world, caplog):
    """check_images (default auto): every image is opened at build; past max_bad_images it is an error that
    lists them, within it they are skipped from the start; evaluation splits accept none."""
    from lavis_pformer.errors import DataError

    records = _records(world)
    bad, gone = _damage(world, records)
    with pytest.raises(DataError) as err:
        _caption_builder(world, max_bad_images=1).build_datasets()
    message = str(err.value)
    assert "2 of the 64 images of datasets.local_caption train cannot be read" in message
    assert bad in message and gone in message and "build_info.max_bad_images: 2" in message
    with caplog.at_level(logging.INFO):
        ds = _caption_builder(world, max_bad_images=2).build_datasets()["train"]
    assert "checked 64 images" in caplog.text and ds.bad_images == {bad, gone}
    caplog.clear()
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=ds.collater)))  # records 1 and 5 replaced
    assert batch["image"].shape == (8, 3, 32, 32) and "skipping" not in caplog.text
    from lavis.common.registry import registry

    test_recs = json.load(open(f"{world}/captions_test.json"))
    os.remove(os.path.join(world, test_recs[3]["image"]))
    cfg = {"build_info": {"images": {"storage": world}, "max_bad_images": 5,
                          "annotations": {"test": {"storage": f"{world}/captions_test.json"}}}}
    with pytest.raises(DataError, match=r"(?s)1 of the 16 images of datasets.local_caption test.*Evaluation needs"):
        registry.get_builder_class("local_caption")(OmegaConf.create(cfg)).build_datasets()
    with pytest.raises(ValueError, match=r"check_images must be auto, true or false, got 'yes'"):
        _caption_builder(world, check_images="yes").build_datasets()


def test_auto_image_check_skips_large_splits(world, monkeypatch, caplog):
    import lavis_pformer.datasets.local_image_text as lit

    _damage(world, _records(world))
    monkeypatch.setattr(lit, "CHECK_IMAGES_AUTO_LIMIT", 10)
    with caplog.at_level(logging.INFO):
        ds = _caption_builder(world).build_datasets()["train"]  # 64 images > 10: not checked, built
    assert "more than 10 images: not checked" in caplog.text and not ds.bad_images
    with pytest.raises(Exception, match="2 of the 64 images"):
        _caption_builder(world, check_images=True).build_datasets()


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


@pytest.fixture(scope="module")
def stage1_checkpoints(tiny, teachers, tmp_path_factory):
    """Stage-1 checkpoints of the tiny Q-Former (cross_attention_freq 1, aligned to the tiny OPT's P-Former):
    {"plain": {"model": state_dict}, "lavis": the same with the run config LAVIS's runner saves}."""
    from lavis.common.registry import registry

    d = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = registry.get_model_class("blip2_qformer_pformer").from_config(OmegaConf.create(dict(
        bert_model=tiny["bert"], vit_model="custom_vit", vit_config={**VIT, "checkpoint": tiny["vit"]}, image_size=32,
        vit_precision="fp32", num_query_token=4, cross_attention_freq=1, embed_dim=16, load_pretrained=False,
        pformer_checkpoint=teachers["opt"])), for_training=True)
    state = {k: v for k, v in model.state_dict().items()}
    paths = {"plain": str(d / "stage1.pth"), "lavis": str(d / "checkpoint_1.pth")}
    torch.save({"model": state}, paths["plain"])
    torch.save({"model": state, "config": {"model": {"arch": "blip2_qformer_pformer"}}, "epoch": 1}, paths["lavis"])
    return paths


def _world(tiny, d):
    world = str(d / "world")
    if not os.path.isdir(world):
        shutil.copytree(tiny["world"], world)
    return world


def _with_world(cfg, world, **build_info):
    info = cfg["datasets"]["local_caption"]["build_info"]
    info.update(images={"storage": world}, annotations={"train": {"storage": f"{world}/captions_train.json"}},
                **build_info)
    return cfg


def _edit_captions(tiny, d, edit):
    world = _world(tiny, d)
    path = f"{world}/captions_train.json"
    records = json.load(open(path))
    text = edit(records)
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(records))
    return world


def _corrupt_image(tiny, d, index=3):
    world = _world(tiny, d)
    record = json.load(open(f"{world}/captions_train.json"))[index]
    with open(os.path.join(world, record["image"]), "wb") as f:
        f.write(b"not an image")
    return world


def _set_caption(i, value):
    def edit(records):
        records[i]["caption"] = value
    return edit


def _model(cfg, **model):
    cfg["model"].update(model)
    return cfg


def _stage2_t5(tiny, teacher, **model):
    cfg = stage2_config(tiny, teacher, "out")
    cfg["model"].pop("opt_model")
    cfg["model"].update(arch="blip2_t5_pformer", t5_model=tiny["t5"], **model)
    return cfg


def _caption_eval(tiny, finetuned):
    cfg = stage2_config(tiny, "", "out")
    cfg["model"].update(load_finetuned=True, finetuned=finetuned)
    cfg["datasets"]["local_caption"]["build_info"]["annotations"] = {
        "test": {"storage": os.path.join(tiny["world"], "captions_test.json")}}
    cfg["run"].update(task="captioning_pformer", evaluate=True, test_splits=["test"], max_len=5, min_len=1,
                      num_beams=1)
    return cfg


def _broken_yaml(d):
    (d / "broken.yaml").write_text("model:\n  arch: pformer_opt\n model_type: [tiny\n")
    return str(d / "broken.yaml")


def _without(cfg, section):
    cfg.pop(section)
    return cfg


T, TE = "tiny", "teachers"
# case: (command, config(tiny, teachers, stage-1 checkpoints, tmp_path), options(tmp_path), message fragments).
# Together with the cases of the other test files listed in docs/reliability.md, this is the bad-input matrix:
# configuration, data, checkpoints, output folder, environment.
BAD_RUNS = {
    # --- configuration
    "cfg_file_missing": ("train", lambda t, te, s1, d: str(d / "nope.yaml"), lambda d: [],
                         ["(missing file)", "--cfg-path", "nope.yaml: no such file"]),
    "yaml_invalid": ("train", lambda t, te, s1, d: _broken_yaml(d), lambda d: [],
                     ["(configuration)", "broken.yaml is not valid YAML", "line 3"]),
    "options_not_key_value": ("train", lambda t, te, s1, d: stage0_config(t, "out"), lambda d: ["run.seed=1", "run.x"],
                              ["--options run.x: each option is key=value"]),
    "no_datasets_section": ("train", lambda t, te, s1, d: _without(stage0_config(t, "out"), "datasets"),
                            lambda d: [], ["the config has no `datasets:` section"]),
    "unknown_arch": ("train", lambda t, te, s1, d: _model(stage0_config(t, "out"), arch="pformer_gpt"), lambda d: [],
                     ["unknown model.arch 'pformer_gpt'", "pformer_opt"]),
    "unknown_model_type": ("train", lambda t, te, s1, d: stage0_config(t, "out"), lambda d: ["model.model_type=opt13b"],
                           ["unknown model.model_type 'opt13b'", "pformer_opt2.7b"]),
    "unknown_builder": ("train", lambda t, te, s1, d: stage0_config(t, "out"),
                        lambda d: ["datasets.sentence_corpuz.build_info.x=1"],
                        ["unknown dataset builder datasets.sentence_corpuz", "sentence_corpus"]),
    "unknown_task": ("train", lambda t, te, s1, d: stage0_config(t, "out"), lambda d: ["run.task=pformer_pretrian"],
                     ["unknown run.task 'pformer_pretrian'", "pformer_pretrain"]),
    "alignment_weight_string": ("train", lambda t, te, s1, d: stage2_config(t, te["opt"], "out"),
                                lambda d: ["model.alignment_weight=10,"],
                                ["model.alignment_weight must be a number, got '10,'", "trailing commas"]),
    "vit_config_unknown_key": ("train", lambda t, te, s1, d: stage2_config(t, te["opt"], "out"),
                               lambda d: ["model.vit_config.depht=2"],
                               ["model.vit_config has unknown keys ['depht']"]),
    "tiny_backbone_missing": ("train", lambda t, te, s1, d: _model(stage0_config(t, "out"),
                                                                    bert_model="output/tiny/backbones/bret"),
                              lambda d: [], ["model.bert_model: 'output/tiny/backbones/bret' is neither",
                                             "python -m lavis_pformer.tiny --out output/tiny"]),
    "hub_name_not_found": ("train", lambda t, te, s1, d: _model(stage0_config(t, "out"),
                                                                 bert_model="no-such-org/no-such-bert"), lambda d: [],
                           ["(missing file)", "model.bert_model='no-such-org/no-such-bert'", "Can't load tokenizer",
                            "HF_HUB_OFFLINE"]),
    "cuda_without_gpu": ("train", lambda t, te, s1, d: stage0_config(t, "out"), lambda d: ["run.device=cuda"],
                         ["(setup)", "run.device is 'cuda' but this machine has no usable GPU", "run.device=cpu"]),
    # --- data
    "corpus_missing": ("train", lambda t, te, s1, d: stage0_config(t, "out", corpus=str(d / "nope.txt")), lambda d: [],
                       ["nope.txt does not exist", "build_info.annotations.<split>.storage"]),
    "corpus_empty": ("train", lambda t, te, s1, d: stage0_config(t, "out", corpus=str(d / "empty.txt")), lambda d: [],
                     ["(data)", "empty.txt contains no sentences", "Fill the file or remove it"]),
    "corpus_not_utf8": ("train", lambda t, te, s1, d: stage0_config(t, "out", corpus=str(d / "latin1.txt")),
                        lambda d: [], ["latin1.txt, line 2: not UTF-8", "max_bad_lines"]),
    "captions_invalid_json": ("train", lambda t, te, s1, d: _with_world(
        stage2_config(t, te["opt"], "out"), _edit_captions(t, d, lambda r: "[{")), lambda d: [],
        ["captions_train.json is not valid JSON"]),
    "caption_not_a_string": ("train", lambda t, te, s1, d: _with_world(
        stage2_config(t, te["opt"], "out"), _edit_captions(t, d, _set_caption(7, 3.5))), lambda d: [],
        ["entry 7: caption 3.5 is not a string"]),
    "image_folder_missing": ("train", lambda t, te, s1, d: stage2_config(t, te["opt"], "out"),
                             lambda d: [f"datasets.local_caption.build_info.images.storage={d / 'nowhere'}"],
                             ["nowhere does not exist", "images.storage"]),
    "unreadable_image": ("train", lambda t, te, s1, d: _with_world(stage2_config(t, te["opt"], "out"),
                                                                   _corrupt_image(t, d)), lambda d: [],
                         ["1 of the 64 images of datasets.local_caption train cannot be read",
                          "max_bad_images: 1 to skip"]),
    "cache_dir_not_a_folder": ("train", lambda t, te, s1, d: stage2_config(t, te["opt"], "out"),
                               lambda d: ["datasets.local_caption.build_info.cache_dir=3"],
                               ["(configuration)", "datasets.local_caption.build_info.cache_dir must be a folder, "
                                "auto or false, got 3"]),
    "max_bad_images_not_a_count": ("train", lambda t, te, s1, d: stage2_config(t, te["opt"], "out"),
                                   lambda d: ["datasets.local_caption.build_info.max_bad_images=3,"],
                                   ["max_bad_images must be an integer >= 0, got '3,'"]),
    # --- checkpoints
    "pformer_checkpoint_truncated": ("train", lambda t, te, s1, d: stage2_config(
        t, _truncated_copy(te["opt"], d / "half.pth"), "out"), lambda d: [],
        ["(checkpoint)", "half.pth", "cannot be read", "model.pformer_checkpoint"]),
    "pformer_checkpoint_other_llm": ("train", lambda t, te, s1, d: stage2_config(t, te["t5"], "out"), lambda d: [],
                                     [f"llm_hidden_size: the checkpoint has {SIZES['t5']['d_model']}, the model expects "
                                      f"{SIZES['opt']['hidden_size']}",
                                      "Train a P-Former for this LLM"]),
    "stage1_of_another_cross_attention_freq": (
        "train", lambda t, te, s1, d: _model(stage2_config(t, te["opt"], "out"), load_pretrained=True,
                                             pretrained=s1["plain"], cross_attention_freq=2), lambda d: [],
        ["stage1.pth (a blip2_qformer_pformer checkpoint) does not fit", "set model.cross_attention_freq: 1"]),
    "stage1_aligned_to_another_llm": (
        "train", lambda t, te, s1, d: _stage2_t5(t, te["t5"], load_pretrained=True, pretrained=s1["plain"],
                                                 cross_attention_freq=1), lambda d: [],
        ["it was aligned to a P-Former of the LLM", "opt", "set model.t5_model"]),
    "finetuned_is_a_stage1_checkpoint": (
        "evaluate", lambda t, te, s1, d: _caption_eval(t, s1["lavis"]), lambda d: [],
        ["written by a 'blip2_qformer_pformer' run, so it is not a checkpoint of this model"]),
    "resume_checkpoint_missing": ("train", lambda t, te, s1, d: stage0_config(t, "out"),
                                  lambda d: ["run.resume_ckpt_path=out/latest/checkpoint_9.pth"],
                                  ["run.resume_ckpt_path: no file at out/latest/checkpoint_9.pth",
                                   "checkpoint_last.pth"]),
    # --- output folder
    "output_dir_under_a_file": ("train", lambda t, te, s1, d: stage0_config(t, "out"),
                                lambda d: [f"run.output_dir={d / 'a_file'}/sub"],
                                ["(output folder)", "a_file is a file, not a folder",
                                 "set run.output_dir to a writable folder"]),
}


def run_cli(command, cfg, workdir, monkeypatch, options=(), debug=False):
    """``cli.main`` in this process and in ``workdir``, as ``train.py`` / ``evaluate.py`` run it."""
    from lavis.common.registry import registry

    from lavis_pformer import cli

    monkeypatch.chdir(workdir)
    for key in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(key, None)
    if isinstance(cfg, dict):
        with open("run.yaml", "w") as f:
            yaml.safe_dump(cfg, f)
        cfg = "run.yaml"
    argv = ["--cfg-path", cfg] + (["--debug"] if debug else []) + (["--options", *options] if options else [])
    return cli.main(command, argv)


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_input_ends_with_a_short_message_and_status_2(tiny, teachers, stage1_checkpoints, tmp_path, monkeypatch,
                                                          capsys, earlier_run, case):
    """train.py / evaluate.py (cli.main, in this process): exit status 2, no traceback, one block that names
    the problem and the fix as its last lines; an earlier run's folders are untouched."""
    command, config, options, fragments = BAD_RUNS[case]
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes(b"a red circle\ncaf\xe9\n")
    (tmp_path / "a_file").write_text("not a folder")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(command, config(tiny, teachers, stage1_checkpoints, tmp_path), tmp_path, monkeypatch,
                options(tmp_path))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    block = err[err.index(f"{command}.py: error ("):]
    assert block.rstrip().endswith("rerun with --debug for the traceback.")
    assert len(block.splitlines()) <= 6, block
    for fragment in fragments:
        assert fragment in block, (fragment, block)
    earlier_run()


def test_debug_shows_the_error_itself(tiny, tmp_path, monkeypatch):
    from lavis_pformer.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown run.task 'nope'") as err:
        run_cli("train", stage0_config(tiny, "out"), tmp_path, monkeypatch, ["run.task=nope"], debug=True)
    assert err.traceback  # raised as is: Python prints its traceback


def test_internal_errors_keep_their_traceback(tiny, tmp_path, monkeypatch):
    """An error that is not a known input mistake is not turned into exit status 2."""
    from lavis_pformer import cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "build", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_cli("train", stage0_config(tiny, "out"), tmp_path, monkeypatch)


def test_unreadable_image_in_a_dataloader_worker_is_a_short_message(tiny, teachers, tmp_path):
    """End to end through train.py: an image that breaks during training (not checked at build), read in a
    DataLoader worker, ends the run with the image's message (without the worker's traceback) and status 2."""
    world = _corrupt_image(tiny, tmp_path, index=5)
    image = json.load(open(f"{world}/captions_train.json"))[5]["image"]
    cfg = _with_world(stage2_config(tiny, teachers["opt"], "out", num_workers=1, batch_size_train=64), world,
                      check_images=False)  # one batch of all 64 records: the first step reads the bad image
    proc = run_script("train.py", cfg, str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("train.py: error (data): image file ") and f"{image} cannot be read" in last[0]
    assert "max_bad_images is 0: raise it" in last[0] and "--debug" in last[1]


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
