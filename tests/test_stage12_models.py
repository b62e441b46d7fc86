"""Stages 1 and 2: blip2_qformer_pformer, blip2_opt_pformer, blip2_t5_pformer on tiny local backbones.

A tiny stage-0 P-Former (OPT and T5) is exported once per module and used as the frozen teacher.
"""
import glob
import logging
import os

import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401  (registers models, tasks, runner)
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from lavis_pformer.backbones import BackboneMixin
from lavis_pformer.models.alignment import AlignmentSetupError, capture_first_output
from lavis_pformer.models.blip2_t5_pformer import Blip2T5PFormer
from lavis_pformer.pformer import PFormer, PFormerCheckpointError
from lavis_pformer.text import QA_PROMPT
from lavis_pformer.tiny import SIZES

from helpers import REPO

Q = 4
VIT = SIZES["vit"]
CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a dog", "a cat sitting next to a tree"]
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)
STAGE1, OPT, T5 = "blip2_qformer_pformer", "blip2_opt_pformer", "blip2_t5_pformer"
LLM_ATTR = {OPT: "opt_model", T5: "t5_model"}
PROJ = {STAGE1: "llm_proj", OPT: "opt_proj", T5: "t5_proj"}


def model_cfg(tiny, name, **overrides):
    cfg = dict(bert_model=tiny["bert"], vit_model="custom_vit", vit_config=VIT, image_size=32, vit_precision="fp32",
               llm_precision="fp32", num_query_token=Q, max_txt_len=24, load_pretrained=False)
    if name == OPT:
        cfg["opt_model"] = tiny["opt"]
    if name == T5:
        cfg["t5_model"] = tiny["t5"]
    cfg.update(overrides)
    return OmegaConf.create({k: v for k, v in cfg.items() if v is not None})


def build(tiny, name, for_training=True, seed=0, **overrides):
    torch.manual_seed(seed)
    return registry.get_model_class(name).from_config(model_cfg(tiny, name, **overrides), for_training=for_training)


def batch(b=4, seed=0, captions=CAPTIONS):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 32, 32, generator=g), "text_input": list(captions[:b])}


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    """Tiny stage-0 P-Formers exported with export_checkpoint: {"opt": path, "t5": path}."""
    paths = {}
    for key, arch, llm_key in (("opt", "pformer_opt", "opt_model"), ("t5", "pformer_t5", "t5_model")):
        torch.manual_seed(1)
        stage0 = registry.get_model_class(arch).from_config(OmegaConf.create(dict(
            bert_model=tiny["bert"], **{llm_key: tiny[key]}, llm_precision="fp32", num_query_token=Q,
            embed_dim=16, load_pretrained=False)))
        paths[key] = stage0.export_checkpoint(str(tmp_path_factory.mktemp(f"stage0_{key}")))
    return paths


def teacher_for(name):
    return "t5" if name == T5 else "opt"


@pytest.fixture(scope="module")
def models(tiny, teachers):
    """One model per stage, built for training with its teacher (stage 1 with the OPT P-Former)."""
    return {name: build(tiny, name, pformer_checkpoint=teachers[teacher_for(name)]) for name in (STAGE1, OPT, T5)}


def llm_of(model):
    for attr in LLM_ATTR.values():
        if hasattr(model, attr):
            return getattr(model, attr)
    return None


# --- alignment loss and the frozen teacher ----------------------------------------------------------------

@pytest.mark.parametrize("name", [STAGE1, OPT, T5])
def test_forward_keeps_lavis_terms_and_adds_alignment(models, name):
    model = models[name].train()
    out = model(batch())
    lavis_terms = {"loss_itc", "loss_itm", "loss_lm"} if name == STAGE1 else {"loss_lm"}
    assert set(out) == lavis_terms | {"loss_align", "loss"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], sum(v for k, v in out.items() if k != "loss"))


@pytest.mark.parametrize("name", [STAGE1, OPT, T5])
def test_alignment_gradient_reaches_only_the_trainable_side(models, name):
    model = models[name].train()
    model.zero_grad(set_to_none=True)
    model(batch())["loss_align"].backward()
    proj = getattr(model, PROJ[name])
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.Qformer.parameters())
    frozen = {"visual_encoder": model.visual_encoder, "pformer_teacher": model.pformer_teacher}
    if name != STAGE1:
        frozen[LLM_ATTR[name]] = llm_of(model)
    for part, module in frozen.items():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), part
    model.zero_grad(set_to_none=True)


def test_projection_output_is_what_lavis_computes(models):
    """The hook captures the image-only query pass (stage 1) / the projection's output (stage 2)."""
    model = models[OPT].eval()
    samples = batch()
    with torch.no_grad(), capture_first_output(model.opt_proj) as captured:
        model(samples)
        expected = model.image_prompt(samples["image"])
    torch.testing.assert_close(captured[0], expected)

    stage1 = models[STAGE1].eval()
    with torch.no_grad(), capture_first_output(stage1.Qformer.bert) as captured:
        stage1(samples)
    assert captured[0].last_hidden_state.shape == (4, Q, stage1.Qformer.config.hidden_size)


@pytest.mark.parametrize("name", [STAGE1, T5])
def test_teacher_stays_in_eval_mode(models, teachers, name):
    model = models[name]
    assert model.train() is model and model.training
    assert not model.pformer_teacher.training
    in_train = model.teacher_prompt(CAPTIONS)
    model.eval()
    torch.testing.assert_close(model.teacher_prompt(CAPTIONS), in_train, rtol=0, atol=0)
    # ... and it is the stage-0 P-Former, unchanged
    reference = PFormer.load(teachers[teacher_for(name)]).eval()
    tokens = model.tokenizer(CAPTIONS, padding="longest", truncation=True, max_length=24, return_tensors="pt")
    torch.testing.assert_close(reference(tokens.input_ids, tokens.attention_mask).prompt, in_train)


def test_teacher_and_llm_are_not_in_state_dict(models):
    for name, model in models.items():
        keys = list(model.state_dict())
        assert not [k for k in keys if k.startswith("pformer_teacher.")], name
        if name != STAGE1:
            assert not [k for k in keys if k.startswith(LLM_ATTR[name] + ".")], name
        # resuming (LAVIS: load_state_dict(strict=True)) accepts what state_dict() gives
        model.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("lavis_cls, name", [(Blip2OPT, OPT), (Blip2T5, T5)])
def test_trainable_parameters_equal_stock_blip2(tiny, models, lavis_cls, name):
    stock = stock_model(tiny, lavis_cls, name)
    trainable = {n for n, p in models[name].named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in stock.named_parameters() if p.requires_grad}
    assert PROJ[name] + ".weight" in trainable and "query_tokens" in trainable


# --- building: what needs a teacher, strict loading ------------------------------------------------------

@pytest.mark.parametrize("name", [STAGE1, OPT])
def test_weight_zero_builds_no_teacher(tiny, name):
    model = build(tiny, name, alignment_weight=0).train()
    assert model.pformer_teacher is None and "pformer_teacher" not in dict(model.named_children())
    out = model(batch())
    assert "loss_align" not in out and torch.isfinite(out["loss"])
    if name == STAGE1:
        assert model.llm_proj is None


def test_weight_zero_stage1_with_llm_hidden_size_has_frozen_llm_proj(tiny):
    model = build(tiny, STAGE1, alignment_weight=0, llm_hidden_size=48)
    assert model.llm_proj.out_features == 48 and not model.llm_proj.weight.requires_grad


@pytest.mark.parametrize("name", [STAGE1, OPT, T5])
def test_for_training_false_builds_no_teacher(tiny, teachers, name):
    model = build(tiny, name, for_training=False, pformer_checkpoint=teachers[teacher_for(name)])
    assert model.pformer_teacher is None
    out = model.eval()(batch())
    assert "loss_align" not in out
    with pytest.raises(RuntimeError, match="image_text_pretrain_pformer"):
        model.train()(batch())


def test_for_training_false_needs_no_pformer_checkpoint(tiny):
    model = build(tiny, OPT, for_training=False)  # no pformer_checkpoint key at all
    assert model.pformer_teacher is None and model.alignment_weight == 100


def _truncated(path, tmp_path):
    data = open(path, "rb").read()
    out = tmp_path / "truncated.pth"
    out.write_bytes(data[: len(data) // 2])
    return str(out)


def _other_vocab(path, tmp_path):
    teacher = PFormer.load(path)
    config = teacher.bert_config.__class__.from_dict(teacher.bert_config.to_dict())
    config.vocab_size += 7
    other = PFormer(config, teacher.num_query_token, teacher.llm_hidden_size, teacher.llm_name, 16, teacher.bert_model)
    out = str(tmp_path / "other_vocab.pth")
    other.save(out)
    return out


STRICT_CASES = {
    # name: (model, cfg overrides given (teachers, tmp_path), exception, message fragments)
    "no_key": (OPT, lambda t, d: {}, AlignmentSetupError, ["model.pformer_checkpoint", "alignment_weight: 0"]),
    "missing_file": (OPT, lambda t, d: {"pformer_checkpoint": str(d / "nope.pth")}, PFormerCheckpointError,
                     ["does not exist"]),
    "truncated_file": (OPT, lambda t, d: {"pformer_checkpoint": _truncated(t["opt"], d)}, PFormerCheckpointError,
                       ["cannot be read"]),
    "wrong_q": (OPT, lambda t, d: {"pformer_checkpoint": t["opt"], "num_query_token": Q + 1}, PFormerCheckpointError,
                ["num_query_token"]),
    "t5_pformer_for_opt": (OPT, lambda t, d: {"pformer_checkpoint": t["t5"]}, PFormerCheckpointError,
                           ["llm_hidden_size", "llm_name"]),
    "opt_pformer_for_t5": (T5, lambda t, d: {"pformer_checkpoint": t["opt"]}, PFormerCheckpointError,
                           ["llm_hidden_size", "llm_name"]),
    "stage1_llm_name": (STAGE1, lambda t, d: {"pformer_checkpoint": t["opt"], "llm_name": "google/flan-t5-xl"},
                        PFormerCheckpointError, ["llm_name"]),
    "stage1_width": (STAGE1, lambda t, d: {"pformer_checkpoint": t["t5"], "llm_hidden_size": 48},
                     PFormerCheckpointError, ["llm_hidden_size"]),
    "stage1_no_key": (STAGE1, lambda t, d: {}, AlignmentSetupError, ["model.pformer_checkpoint"]),
    "weight_string": (STAGE1, lambda t, d: {"pformer_checkpoint": t["opt"], "alignment_weight": "10,"}, ValueError,
                      ["alignment_weight", "trailing commas"]),
    "bert_vocab": (OPT, lambda t, d: {"pformer_checkpoint": _other_vocab(t["opt"], d)}, PFormerCheckpointError,
                   ["vocabulary"]),
    "stage0_training_checkpoint": (OPT, lambda t, d: {"pformer_checkpoint": _lavis_checkpoint(d)},
                                   PFormerCheckpointError, ["LAVIS training checkpoint"]),
}


def _lavis_checkpoint(tmp_path):
    out = str(tmp_path / "checkpoint_0.pth")
    torch.save({"model": {"pformer.temp": torch.tensor(0.07)}, "epoch": 0}, out)
    return out


@pytest.mark.parametrize("case", sorted(STRICT_CASES))
def test_strict_teacher_loading_fails_loudly(tiny, teachers, tmp_path, case):
    name, overrides, exc, fragments = STRICT_CASES[case]
    with pytest.raises(exc) as err:
        build(tiny, name, **overrides(teachers, tmp_path))
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_stage1_takes_width_from_a_t5_pformer(tiny, teachers):
    model = build(tiny, STAGE1, pformer_checkpoint=teachers["t5"]).train()
    assert model.llm_proj.out_features == PFormer.load(teachers["t5"]).llm_hidden_size
    assert torch.isfinite(model(batch())["loss_align"])


# --- checkpoints between stages and into stock LAVIS -------------------------------------------------------

def test_stage1_llm_proj_carries_into_stage2(tiny, teachers, models, tmp_path, caplog):
    stage1 = models[STAGE1]
    path = str(tmp_path / "stage1.pth")
    torch.save({"model": stage1.state_dict()}, path)
    with caplog.at_level(logging.WARNING):
        stage2 = build(tiny, OPT, seed=5, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=path)
    torch.testing.assert_close(stage2.opt_proj.weight, stage1.llm_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(stage2.opt_proj.bias, stage1.llm_proj.bias, rtol=0, atol=0)
    torch.testing.assert_close(stage2.query_tokens, stage1.query_tokens, rtol=0, atol=0)
    assert "unexpected" not in caplog.text and "not in the checkpoint" not in caplog.text

    # a stage-1 model built for inference recreates llm_proj from the checkpoint
    reloaded = build(tiny, STAGE1, for_training=False, load_pretrained=True, pretrained=path)
    torch.testing.assert_close(reloaded.llm_proj.weight, stage1.llm_proj.weight, rtol=0, atol=0)

    # stage 1 trained against the T5 P-Former cannot start the OPT stage 2
    t5_stage1 = build(tiny, STAGE1, pformer_checkpoint=teachers["t5"])
    torch.save({"model": t5_stage1.state_dict()}, path)
    with pytest.raises(ValueError, match="another LLM"):
        build(tiny, OPT, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=path)


def stock_model(tiny, lavis_cls, name):
    """Stock LAVIS Blip2OPT / Blip2T5 with only the hard-coded backbones redirected to the tiny ones."""

    class Stock(lavis_cls):
        init_tokenizer = BackboneMixin.init_tokenizer
        init_Qformer = BackboneMixin.init_Qformer
        init_vision_encoder = BackboneMixin.init_vision_encoder

        def __init__(self, **kwargs):
            BackboneMixin.set_backbones(self, tiny["bert"], VIT)
            super().__init__(**kwargs)

    llm_key = LLM_ATTR[name]
    torch.manual_seed(123)
    model = Stock(vit_model="custom_vit", img_size=32, vit_precision="fp32", num_query_token=Q,
                  **{llm_key: tiny["opt" if name == OPT else "t5"]})
    return model.float()  # as lavis.models.load_model does on CPU


@pytest.mark.parametrize("lavis_cls, name", [(Blip2OPT, OPT), (Blip2T5, T5)])
def test_stage2_checkpoint_generates_the_same_in_stock_lavis(tiny, models, tmp_path, lavis_cls, name):
    ours = models[name].eval()
    path = str(tmp_path / "stage2.pth")
    torch.save({"model": ours.state_dict()}, path)
    stock = stock_model(tiny, lavis_cls, name)
    lavis_cls.load_from_pretrained(stock, path)  # LAVIS's own loader (strict=False)
    stock.eval()
    weights = {k: v for k, v in ours.state_dict().items() if k != "_extra_state"}  # the record stock LAVIS ignores
    for key, value in weights.items():
        torch.testing.assert_close(stock.state_dict()[key], value, rtol=0, atol=0, msg=key)
    samples = {"image": batch()["image"]}
    kwargs = dict(num_beams=2, max_length=6, min_length=1)
    assert stock.generate(samples, **kwargs) == ours.generate(samples, **kwargs)


# --- inference: predict_answers, lemmatizer ----------------------------------------------------------------

QUESTIONS = ["what color is the circle?", "how many shapes are there in the picture on the left?", "is"]


@pytest.mark.parametrize("name", [OPT, T5])
def test_predict_answers_one_string_per_question(models, name):
    model = models[name].eval()
    samples = {"image": batch(3)["image"], "text_input": QUESTIONS}
    answers = model.predict_answers(samples, num_beams=2, max_len=5, prompt=QA_PROMPT)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="generate"):
        model.predict_answers(samples, inference_method="rank")


def test_opt_predict_answers_left_padding_matches_single_questions(models):
    model = models[OPT].eval()
    image = batch(3)["image"]
    kwargs = dict(num_beams=1, max_len=5, prompt=QA_PROMPT)
    together = model.predict_answers({"image": image, "text_input": QUESTIONS}, **kwargs)
    alone = [model.predict_answers({"image": image[i:i + 1], "text_input": [q]}, **kwargs)[0]
             for i, q in enumerate(QUESTIONS)]
    assert together == alone
    assert model.opt_tokenizer.padding_side == "right"  # training tokenization unaffected


@pytest.mark.parametrize("name", [OPT, T5])
def test_long_question_prompt_is_never_truncated(models, monkeypatch, name):
    """A question longer than max_txt_len (24 here) keeps its whole prompt, "Short answer:" included."""
    model = models[name].eval()
    llm = llm_of(model)
    tokenizer = model.opt_tokenizer if name == OPT else model.t5_tokenizer
    question = "is the small red circle that is left of the big blue square and above the green triangle " * 3
    prompt = QA_PROMPT
    full = tokenizer(prompt.format(question.strip()), add_special_tokens=False).input_ids
    assert len(full) > 2 * model.max_txt_len
    seen = {}
    original = type(llm).generate

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(llm), "generate", spy)
    model.predict_answers({"image": batch(2)["image"], "text_input": [question.strip(), "what color?"]},
                          num_beams=1, max_len=3, prompt=prompt)
    if name == OPT:  # the prompt tokens follow the soft prompt in input_ids (left padding)
        read = seen["input_ids"][0].tolist()
    else:  # T5's encoder reads [soft prompt ; question tokens]: recover the tokens from their embeddings
        embeds = seen["inputs_embeds"][0, Q:]
        table = llm.encoder.embed_tokens.weight
        read = [int((table - e).abs().sum(1).argmin()) for e in embeds]
    text = tokenizer.decode(read, skip_special_tokens=True)
    assert text.strip().endswith("Short answer:") and question.strip()[:40] in text


class FakeToken:
    def __init__(self, text):
        self.text, self.pos_, self.lemma_ = text, "NOUN", text.upper()


@pytest.mark.parametrize("name", [OPT, T5])
def test_apply_lemmatizer_postprocesses_answers(models, name):
    model = models[name].eval()
    samples = {"image": batch(2)["image"], "text_input": QUESTIONS[:2]}
    plain = model.predict_answers(samples, num_beams=1, max_len=4)
    model._apply_lemmatizer, model._lemmatizer = True, lambda text: [FakeToken(w) for w in text.split()]
    try:
        lemmatized = model.predict_answers(samples, num_beams=1, max_len=4)
    finally:
        model._apply_lemmatizer, model._lemmatizer = False, None
    assert lemmatized == [" ".join(w.upper() for w in a.split()) for a in plain]


@pytest.mark.parametrize("name", [OPT, T5])
def test_apply_lemmatizer_with_spacy(tiny, name):
    try:
        import spacy

        spacy.load("en_core_web_sm")
    except (ImportError, OSError) as e:
        pytest.skip(f"spaCy's en_core_web_sm is not installed ({type(e).__name__}); "
                    "`python -m spacy download en_core_web_sm` enables this test")
    model = build(tiny, name, for_training=False, apply_lemmatizer=True).eval()
    answers = model.predict_answers({"image": batch(2)["image"], "text_input": QUESTIONS[:2]}, num_beams=1, max_len=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_missing_lemmatizer_is_a_clear_error(models, monkeypatch):
    model = models[OPT]
    monkeypatch.setattr(model, "_lemmatizer", None)
    import spacy

    def no_model(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", no_model)
    with pytest.raises(RuntimeError, match="en_core_web_sm"):
        model.lemmatizer


# --- T5 caption split -----------------------------------------------------------------------------------

def test_t5_splits_captions_of_any_length(models, monkeypatch):
    model = models[T5].train()
    long_caption = " ".join(["red"] * 15 + ["circle"] * 15)
    captions = ["dog", "two dogs", long_caption]
    seen = {}
    original_lavis_forward, original_teacher = Blip2T5.forward, Blip2T5PFormer.teacher_prompt

    def spy_lavis(self, samples):
        seen["lavis"] = dict(samples)
        return original_lavis_forward(self, samples)

    def spy_teacher(self, texts):
        seen["teacher"] = list(texts)
        return original_teacher(self, texts)

    monkeypatch.setattr(Blip2T5, "forward", spy_lavis)
    monkeypatch.setattr(Blip2T5PFormer, "teacher_prompt", spy_teacher)
    for _ in range(3):
        out = model({"image": batch(3)["image"], "text_input": captions})
        assert all(torch.isfinite(v) for v in out.values())
        assert seen["teacher"] == captions
        prefixes, suffixes = seen["lavis"]["text_input"], seen["lavis"]["text_output"]
        assert prefixes[0] == "dog" and suffixes[0] == ""
        for caption, prefix, suffix in zip(captions, prefixes, suffixes):
            assert prefix and f"{prefix} {suffix}".strip() == caption
    # samples that already carry text_output go to LAVIS unchanged; the teacher reads both parts
    model({"image": batch(1)["image"], "text_input": ["a red"], "text_output": ["circle"]})
    assert seen["lavis"]["text_input"] == ["a red"] and seen["teacher"] == ["a red circle"]


def test_t5_caption_prompt_is_the_encoder_prefix(models, monkeypatch):
    model = models[T5]
    monkeypatch.setattr(model, "prompt", "a photo of")
    split = model.prepare_lavis_samples({"text_input": ["a photo of a dog", "a photo of"]})
    assert split["text_input"][0] == "a photo of" and split["text_output"][0] == "a dog"
    assert model.alignment_texts({"text_input": ["a photo of a dog"]}) == ["a dog"]


def test_t5_stage2_split_uses_the_stage2_distribution(models, monkeypatch):
    import random

    model = models[T5]
    monkeypatch.setattr(model, "rng", random.Random(0))
    caption = " ".join(f"w{i}" for i in range(10))
    lengths = {len(model.split_caption(caption)[0].split()) for _ in range(300)}
    assert lengths == set(range(1, 6))  # 1 .. 10 // 2
    assert model.split_caption("dog") == ("dog", "")


# --- lm_weight: alignment-only stage 2 ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [OPT, T5])
def test_alignment_only_stage2(tiny, teachers, monkeypatch, name):
    """lm_weight 0: loss = loss_align alone, the LLM is never run, and loss_align and its gradient are those of
    the same model with the LM loss on."""
    full = build(tiny, name, seed=5, pformer_checkpoint=teachers[teacher_for(name)]).train()
    only = build(tiny, name, seed=5, pformer_checkpoint=teachers[teacher_for(name)], lm_weight=0).train()
    assert full.lm_weight == 1.0 and only.lm_weight == 0.0
    samples = batch()
    torch.manual_seed(0)
    expected = full(samples)
    trainable = [p for p in full.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected["loss_align"], trainable, allow_unused=True)

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM must not run when lm_weight is 0")

    monkeypatch.setattr(llm_of(only), "forward", no_llm)
    torch.manual_seed(0)
    out = only(samples)
    assert set(out) == {"loss", "loss_align"}
    torch.testing.assert_close(out["loss"], expected["loss_align"])
    grads = torch.autograd.grad(out["loss"], [p for p in only.parameters() if p.requires_grad], allow_unused=True)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_lm_weight_scales_the_lm_loss_and_is_checked(tiny, teachers):
    one = build(tiny, OPT, seed=5, pformer_checkpoint=teachers["opt"]).train()
    two = build(tiny, OPT, seed=5, pformer_checkpoint=teachers["opt"], lm_weight=2.5).train()
    torch.manual_seed(0)
    a = one(batch())
    torch.manual_seed(0)
    b = two(batch())
    torch.testing.assert_close(b["loss_lm"], 2.5 * a["loss_lm"])
    torch.testing.assert_close(b["loss"], b["loss_lm"] + b["loss_align"])
    with pytest.raises(ValueError, match="both 0"):
        build(tiny, OPT, lm_weight=0, alignment_weight=0)
    with pytest.raises(ValueError, match="lm_weight must be a number"):
        build(tiny, T5, lm_weight="0,", pformer_checkpoint=teachers["t5"])
    inference = build(tiny, T5, for_training=False, lm_weight=0)
    with pytest.raises(RuntimeError, match="built without its P-Former teacher"):
        inference.train()(batch())
    with pytest.raises(RuntimeError, match="lm_weight is 0 and there is no P-Former teacher"):
        inference.eval()(batch())


# --- training on a fixed batch ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [STAGE1, OPT])
def test_loss_falls_on_a_fixed_batch(tiny, teachers, name):
    model = build(tiny, name, seed=3, pformer_checkpoint=teachers["opt"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    samples = batch()
    torch.manual_seed(0)
    history = []
    for _ in range(20):
        out = model(samples)
        assert all(torch.isfinite(v) for v in out.values()), out
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[:3], history[-3:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    assert mean(last, "loss") < 0.8 * mean(first, "loss"), history
    assert mean(last, "loss_align") < mean(first, "loss_align")


# --- tasks, model zoo, configs ---------------------------------------------------------------------------

def test_tasks_build_the_teacher_only_for_training(tiny, teachers):
    cfg = OmegaConf.create({"model_cfg": dict(model_cfg(tiny, OPT, pformer_checkpoint=teachers["opt"]), arch=OPT),
                            "run_cfg": {"evaluate": False, "num_beams": 1, "max_len": 5, "min_len": 1}})
    for task_name in ("image_text_pretrain_pformer", "captioning_pformer"):
        task = registry.get_task_class(task_name).setup_task(cfg=cfg)
        assert task.build_model(cfg).pformer_teacher is not None
        cfg.run_cfg.evaluate = True
        assert task.build_model(cfg).pformer_teacher is None
        cfg.run_cfg.evaluate = False
    stage0_cfg = OmegaConf.create({"model_cfg": dict(arch="pformer_opt", bert_model=tiny["bert"], opt_model=tiny["opt"],
                                                     llm_precision="fp32", num_query_token=Q, embed_dim=16,
                                                     load_pretrained=False), "run_cfg": {"evaluate": False}})
    stage0_task = registry.get_task_class("pformer_pretrain").setup_task(cfg=stage0_cfg)
    assert stage0_task.build_model(stage0_cfg).pformer is not None


def test_model_zoo_type_without_weights_builds_with_a_warning(tiny, teachers, tmp_path, monkeypatch, caplog):
    from lavis.models import load_model_and_preprocess

    cls = registry.get_model_class(OPT)
    zoo = OmegaConf.load(cls.default_config_path("pretrain_opt2.7b"))
    zoo.model = OmegaConf.merge(zoo.model, model_cfg(tiny, OPT, load_pretrained=True, pretrained=""))
    path = str(tmp_path / "zoo.yaml")
    OmegaConf.save(zoo, path)
    monkeypatch.setitem(cls.PRETRAINED_MODEL_CONFIG_DICT, "tiny_zoo", path)
    with caplog.at_level(logging.WARNING):
        model, vis, txt = load_model_and_preprocess(OPT, "tiny_zoo", is_eval=True)
    assert "no weights are loaded" in caplog.text and "load_checkpoint" in caplog.text
    assert model.pformer_teacher is None and not model.training
    assert set(vis) == {"train", "eval"} and set(txt) == {"train", "eval"}
    # a training / evaluation run (from_config) with the same empty path is an error
    with pytest.raises(ValueError, match="model.pretrained is empty"):
        cls.from_config(zoo.model)  # evaluation run
    zoo.model.pformer_checkpoint = teachers["opt"]
    with pytest.raises(ValueError, match="model.pretrained is empty"):
        cls.from_config(zoo.model, for_training=True)


MODEL_TYPES = {
    STAGE1: {"pretrain": (224, 10)},
    OPT: {"pretrain_opt2.7b": (224, 100), "pretrain_opt6.7b": (224, 100), "caption_coco_opt2.7b": (364, 100)},
    T5: {"pretrain_flant5xl": (224, 100), "caption_coco_flant5xl": (364, 100)},
}


def test_model_type_yamls(tiny):
    for name, types in MODEL_TYPES.items():
        cls = registry.get_model_class(name)
        assert set(cls.PRETRAINED_MODEL_CONFIG_DICT) == set(types) | {"tiny"}  # tiny: test_tiny_chain.py
        for model_type, (size, weight) in types.items():
            cfg = OmegaConf.load(cls.default_config_path(model_type))
            assert cfg.model.arch == name and cfg.model.image_size == size
            assert cfg.model.alignment_weight == weight and isinstance(cfg.model.alignment_weight, int)
            assert cfg.model.bert_model == "bert-base-uncased" and cfg.model.vit_model == "eva_clip_g"
            for split in ("train", "eval"):
                assert cfg.preprocess.vis_processor[split].image_size == size
                assert cfg.preprocess.text_processor[split].name == "blip_caption"
            # every key is one from_config reads with the right type (tiny backbones swapped in)
            small = model_cfg(tiny, name, load_pretrained=False, load_finetuned=False)
            merged = OmegaConf.merge(cfg.model, {k: v for k, v in small.items()})
            assert registry.get_model_class(name).from_config(merged).pformer_teacher is None


RUN_CONFIGS = {
    "pretrain_stage1.yaml": (STAGE1, "image_text_pretrain_pformer", 10),
    "pretrain_stage2_opt2.7b.yaml": (OPT, "image_text_pretrain_pformer", 100),
    "pretrain_stage2_flant5xl.yaml": (T5, "image_text_pretrain_pformer", 100),
    "caption_coco_ft_opt2.7b.yaml": (OPT, "captioning_pformer", 100),
}


@pytest.mark.parametrize("file", sorted(RUN_CONFIGS))
def test_run_configs_merge_with_lavis_config_and_build(tiny, teachers, file):
    """LAVIS's Config merges the run config over the model-type yaml; the result builds (tiny backbones)."""
    import argparse

    from lavis.common.config import Config

    arch = RUN_CONFIGS[file][0]
    llm = {OPT: [f"model.opt_model={tiny['opt']}"], T5: [f"model.t5_model={tiny['t5']}"]}.get(arch, [])
    options = [f"model.bert_model={tiny['bert']}", "model.vit_model=custom_vit", "model.image_size=32",
               "model.vit_precision=fp32", "model.llm_precision=fp32", f"model.num_query_token={Q}",
               "model.load_pretrained=False", f"model.pformer_checkpoint={teachers[teacher_for(arch)]}"]
    options += [f"model.vit_config.{k}={v}" for k, v in VIT.items()] + llm
    cfg = Config(argparse.Namespace(cfg_path=os.path.join(REPO, "projects/pformer/train", file), options=options))
    assert cfg.model_cfg.alignment_weight == RUN_CONFIGS[file][2]
    task = registry.get_task_class(cfg.run_cfg.task).setup_task(cfg=cfg)
    model = task.build_model(cfg)
    assert isinstance(model, registry.get_model_class(arch)) and model.pformer_teacher is not None


def test_run_configs_use_registered_parts_and_paper_settings():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "projects/pformer/train/*.yaml")))
    assert set(RUN_CONFIGS) <= set(found)
    for file, (arch, task, weight) in RUN_CONFIGS.items():
        cfg = OmegaConf.load(os.path.join(REPO, "projects/pformer/train", file))
        assert cfg.model.arch == arch
        assert cfg.model.model_type in registry.get_model_class(arch).PRETRAINED_MODEL_CONFIG_DICT
        assert cfg.model.alignment_weight == weight
        assert cfg.run.task == task and registry.get_task_class(task) is not None
        assert cfg.run.runner == "runner_pformer" and cfg.run.weight_decay == 0.05
        for builder in cfg.datasets:
            assert registry.get_builder_class(builder) is not None, builder
        if task == "image_text_pretrain_pformer":
            assert set(cfg.datasets) == {"coco_caption", "vg_caption", "conceptual_caption_3m", "sbu_caption"}
            assert (cfg.run.init_lr, cfg.run.min_lr, cfg.run.warmup_lr, cfg.run.max_epoch) == (1e-4, 1e-5, 1e-6, 10)
            assert cfg.run.batch_size_train == 128 and cfg.run.warmup_steps == (5000 if arch == STAGE1 else 2000)
        script = os.path.join(REPO, "run_scripts/pformer/train", file.replace(".yaml", ".sh"))
        text = open(script).read()
        assert os.access(script, os.X_OK) and "NPROC=${NPROC:-8}" in text and file in text
        assert '/launch.sh" train.py' in text
