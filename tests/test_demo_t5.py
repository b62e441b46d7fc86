"""The demo's frozen T5 (lavis_pformer.demo.t5_lm, t5_data, t5_eval): the trainer on a tiny shapes world, the examples'
layout, the text ceiling on hand-made cases, the backbones' T5 part and the committed t5/."""
import json
import os
import random
import re

import pytest
import torch

from lavis_pformer.demo import t5_data, t5_eval
from lavis_pformer.demo.t5_lm import train_t5
from lavis_pformer.synthetic import shapes_world
from lavis_pformer.text import QA_PROMPT

TINY_T5 = dict(steps=30, layers=1, width=32, heads=2, ffn=64, batch_size=16, lr=3e-3, log_every=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("t5_world"))
    shapes_world.generate(root, seed=0, n_train=4, n_val=16, n_test=4, n_corpus=300, n_vision=0)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t5_out"))
    logs = []
    report = train_t5(world, out, log=logs.append, **TINY_T5)
    return out, report, logs


def test_the_trainer_writes_a_folder_lavis_and_pformer_t5_load(trained):
    from transformers import T5ForConditionalGeneration as HFT5

    from helpers import build_model

    out, report, _ = trained
    for name in ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "t5_report.json"):
        assert os.path.exists(os.path.join(out, name)), name
    tokenizer, model = t5_eval.load_t5(out)  # as Blip2T5 loads it: T5TokenizerFast + LAVIS's T5ForConditionalGeneration
    assert type(model).__module__ == "lavis.models.blip2_models.modeling_t5"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1) and tokenizer("").input_ids == [1]
    assert tokenizer("a red circle at the top left").input_ids[-1] == 1
    assert model.config.d_model == 32 and model.config.num_layers == model.config.num_decoder_layers == 1
    assert model.config.vocab_size == len(tokenizer) == report["sizes"]["vocab_size"]
    # the saved weights are the trained ones, with the activation LAVIS sets: same logits through both classes
    ids = torch.tensor([tokenizer("a red circle at the top left Question: how many objects are there? Short answer:").input_ids])
    dec = torch.tensor([[0, 5]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, decoder_input_ids=dec).logits,
                              HFT5.from_pretrained(out)(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-5)
    stage0 = build_model("pformer_t5", "tiny", t5_model=out, bert_model=_bert(out), llm_precision="fp32",
                         num_query_token=4, max_txt_len=24, embed_dim=16)
    losses = stage0({"text_input": ["a red circle at the top left", "a blue square at the top right"]})
    assert torch.isfinite(losses["loss"]) and losses["loss_lm"] > 0


def _bert(out):
    from lavis_pformer.tiny import build_bert

    path = os.path.join(os.path.dirname(out), "bert_for_t5_test")
    return path if os.path.exists(path) else build_bert(path, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=64)


def test_training_lowers_the_loss_and_reports_the_ceiling(trained):
    out, report, logs = trained
    with open(os.path.join(out, "t5_report.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    history = saved["loss_history"]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert saved["loss_first"] > history[-1]["loss"] and history[0]["loss"] > history[-1]["loss"]
    assert set(saved["accuracy"]) == {"color", "shape", "count", "yesno"}
    ceiling = saved["text_ceiling"]
    assert ceiling["questions"] == sum(v["questions"] for v in ceiling["per_type"].values()) > 0
    assert set(saved["caption_continuation"]) >= {"empty_prefix", "prefix"} and saved["caption_continuation"]["captions"] == 16
    assert saved["corpus"]["texts"] == 300 and 0 < saved["corpus"]["with_context"] < 300
    assert any("step 30/30" in line for line in logs)


def test_position_biases_learn_at_their_own_rate():
    from lavis_pformer.demo.t5_lm import adamw, build_model

    model = build_model(40, layers=2, width=16, heads=2, ffn=32)
    optim = adamw(model, 1e-3, 0.01, position_lr_scale=50)
    groups = [{id(p) for p in g["params"]} for g in optim.param_groups]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(names)  # every parameter, once
    decay, no_decay, position = groups
    assert {names[i] for i in position} == {n for n in names.values() if "relative_attention_bias" in n} != set()
    assert all(names[i].endswith("layer_norm.weight") for i in no_decay)
    assert [g["lr_scale"] for g in optim.param_groups] == [1.0, 1.0, 50] and optim.param_groups[0]["weight_decay"] == 0.01
    assert model.lm_head.weight.std() < 2 * 16 ** -0.5  # logits of order 1 at the start


def test_corpus_lines_become_the_layouts_of_the_runs(trained):
    out, _, _ = trained
    tokenizer, _ = t5_eval.load_t5(out)
    plain = t5_data.parse_line("a red circle at the top left. Question: what color is the circle? Short answer: red")
    assert plain == t5_data.Record("a red circle at the top left", "what color is the circle?", "red", False)
    context = t5_data.parse_line("a red circle at the top left.</s>Question: how many objects are there? Short answer: 1")
    assert context == t5_data.Record("a red circle at the top left", "how many objects are there?", "1", True)
    again = t5_data.parse_line("a red circle at the top left.</s>a red circle at the top left.")
    assert again == t5_data.Record("a red circle at the top left", None, None, True)

    rng = random.Random(0)
    qa = [t5_data.example(plain, rng, qa_share=1.0) for _ in range(3)]
    assert set(qa) == {t5_data.Example("a red circle at the top left", QA_PROMPT.format("what color is the circle?"),
                                       "red", True)}
    continued = [t5_data.example(again, rng, qa_share=1.0) for _ in range(200)]
    assert all(e.context == again.caption and not e.answer for e in continued)
    assert all(f"{e.text} {e.target}".strip() == again.caption for e in continued)
    # stage 0's prefix lengths 1 .. 1 + n // 2 and the empty prefix of zero-shot captioning
    assert {len(e.text.split()) for e in continued} == set(range(0, 1 + 7 // 2 + 1))
    no_context = t5_data.example(plain._replace(question=None), rng, qa_share=1.0)
    assert no_context.context == "" and f"{no_context.text} {no_context.target}".strip() == plain.caption

    examples = qa[:1] + [e for e in continued if e.text == ""][:1] + [no_context]
    input_ids, mask, labels, weights = t5_data.encode(tokenizer, examples)
    for i, e in enumerate(examples):
        # the caption's ids where the soft prompt goes, then the text as LAVIS tokenizes it (ending in </s>)
        expected = tokenizer(e.context, add_special_tokens=False).input_ids + tokenizer(e.text).input_ids
        n = int(mask[i].sum())
        assert input_ids[i, :n].tolist() == expected and (input_ids[i, n:] == 0).all()
        target = tokenizer(e.target).input_ids
        assert labels[i, : len(target)].tolist() == target and (labels[i, len(target):] == -100).all()
        assert (weights[i, : len(target)] == (t5_data.ANSWER_WEIGHT if e.answer else 1.0)).all()
        assert (weights[i, len(target):] == 0).all()


class ReadingStub(torch.nn.Module):
    """A stand-in for T5 that reads its encoder input back (one-hot embeddings) and answers by rule: colour and
    count questions from the caption it finds first, every shape question "circle"; a caption input (no question)
    is continued by the caption it starts with, minus ``drop`` last words."""

    def __init__(self, tokenizer, captions, drop=0):
        super().__init__()
        self.tokenizer, self.captions, self.drop = tokenizer, captions, drop
        self.embed = torch.nn.Embedding(len(tokenizer), len(tokenizer))
        self.embed.weight.data = torch.eye(len(tokenizer))

    def get_input_embeddings(self):
        return self.embed

    def answer(self, text):
        assert text.endswith("</s>") and text.count("</s>") == 1, text  # the text's </s> ends the encoder input
        text = text[: -len("</s>")].strip()
        caption, sep, question = text.partition(" Question: ")
        caption = next(c for c in self.captions if text.startswith(c))
        if not sep:
            words = caption.split()[len(text.split()) - len(caption.split()):]
            return " ".join(words[: len(words) - self.drop])
        question = question[: -len(" Short answer:")]
        if question.startswith("what color"):
            shape = question.split()[-1].rstrip("?")
            return re.search(r"(\w+) " + shape, caption).group(1)
        if question.startswith("how many"):
            return str(caption.count(" and ") + caption.count(", ") + 1)
        return "circle"

    def generate(self, inputs_embeds, attention_mask, **kwargs):
        rows = []
        for embeds, mask in zip(inputs_embeds, attention_mask):
            n = int(mask.sum())
            assert mask[:n].all(), "padding only after the text"
            rows.append([0] + self.tokenizer(self.answer(self.tokenizer.decode(embeds[:n].argmax(-1)))).input_ids)
        return t5_data.pad(rows, 0)


def _hand_made_world(root):
    scenes = {1: ("a red circle at the top left and a blue square at the bottom right.",
                  [("what color is the square?", "blue", "color"), ("what shape is the red object?", "circle", "shape"),
                   ("how many objects are there?", "2", "count")]),
              2: ("a green triangle at the top right and a yellow circle at the bottom left.",
                  [("what color is the circle?", "yellow", "color"), ("what shape is the green object?", "triangle",
                                                                      "shape"), ("how many objects are there?", "2", "count")])}
    captions = [{"image": f"images/val/{i}.png", "caption": c, "image_id": str(i)} for i, (c, _) in scenes.items()]
    questions = [{"question_id": 10 * i + j, "question": q, "image": f"images/val/{i}.png", "image_id": i,
                  "answer": [a], "question_type": t} for i, (_, qs) in scenes.items() for j, (q, a, t) in enumerate(qs)]
    with open(os.path.join(root, "captions_val.json"), "w") as f:
        json.dump(captions, f)
    with open(os.path.join(root, "vqa_val.json"), "w") as f:
        json.dump(questions, f)
    with open(os.path.join(root, "world.json"), "w") as f:
        json.dump({"answers": {"color": ["red", "green", "blue", "yellow"], "shape": ["circle", "square", "triangle"],
                               "count": ["1", "2", "3"]}}, f)
    return [c["caption"].rstrip(".") for c in captions]


def test_text_ceiling_and_continuation_on_hand_made_cases(trained, tmp_path):
    out, _, _ = trained
    tokenizer, _ = t5_eval.load_t5(out)
    captions = _hand_made_world(str(tmp_path))
    stub = ReadingStub(tokenizer, captions)
    result = t5_eval.text_ceiling(stub, tokenizer, str(tmp_path))
    per_type = {t: v["accuracy"] for t, v in result["per_type"].items()}
    assert per_type == {"color": 1.0, "shape": 0.5, "count": 1.0}
    assert result["overall_excl_yesno"] == pytest.approx(5 / 6) and result["questions"] == 6
    assert result["color_shape_by_objects"] == {"2": 0.75}
    assert t5_eval.caption_continuation(stub, tokenizer, str(tmp_path)) == {
        "empty_prefix": 1.0, "prefix": 1.0, "captions": 2, "split": "val"}
    short = t5_eval.caption_continuation(ReadingStub(tokenizer, captions, drop=1), tokenizer, str(tmp_path))
    assert short["empty_prefix"] == short["prefix"] == 0.0
    # a soft prompt stands where the caption stood: here the caption's own embeddings, so the same answers
    items = t5_eval.question_items(str(tmp_path), "val")
    ids = [tokenizer(it["caption"], add_special_tokens=False).input_ids for it in items]
    assert len({len(i) for i in ids}) == 1
    prompts = stub.embed(torch.tensor(ids))
    texts = [QA_PROMPT.format(it["question"]) for it in items]
    assert t5_eval.generate(stub, tokenizer, texts, prompts=prompts) == t5_eval.generate(
        stub, tokenizer, texts, contexts=[it["caption"] for it in items]) == ["blue", "circle", "2", "yellow",
                                                                               "circle", "2"]


SMOKE = {
    "seed": 0,
    "world": dict(n_train=48, n_val=16, n_test=16, n_corpus=300, n_vision=64, context_fraction=0.5),
    "vit": dict(config=dict(patch_size=16, embed_dim=32, depth=1, num_heads=2), steps=5, batch_size=32, lr=2e-3),
    "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "t5": dict(TINY_T5, threads=1, quick_eval=False),
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Smoke-size backbones with a T5 part (no OPT), built by frozen_backbones.build."""
    from lavis_pformer.demo import frozen_backbones as fb

    root = tmp_path_factory.mktemp("t5_backbones")
    folder, work = str(root / "backbones"), str(root / "work")
    manifest = fb.build(folder, SMOKE, work=work, threads=1, log=lambda *_: None)
    return folder, work, manifest


def test_the_t5_part_is_built_checked_and_rebuilt_alone(backbones, tmp_path):
    import shutil

    from lavis_pformer.demo import frozen_backbones as fb

    folder, work, manifest = backbones
    assert fb.verify(folder, SMOKE) == manifest
    assert {"t5/config.json", "t5/pytorch_model.bin", "t5/spiece.model", "t5/tokenizer.json"} <= set(manifest["files"])
    quality = manifest["quality"]
    assert set(quality["t5_text_ceiling_val"]["caption_first"]) == {"color", "shape", "count", "yesno"}
    assert set(quality["t5_caption_continuation_val"]) == {"empty_prefix", "prefix"} and "lm_parameters" not in quality
    assert set(manifest["build_time_s"]) == {"vit", "bert", "t5", "total"}
    copy = str(tmp_path / "backbones")
    shutil.copytree(folder, copy)
    kept = {rel: d for rel, d in manifest["files"].items() if not rel.startswith("t5/")}
    # the same recipe builds the same bytes; another T5 recipe rebuilds t5/ alone and leaves the rest byte for byte
    again = fb.build(copy, SMOKE, work=work, threads=1, log=lambda *_: None, parts=["t5"])
    assert again["files"] == manifest["files"] and again["quality"] == manifest["quality"]
    other = dict(SMOKE, t5=dict(SMOKE["t5"], lr=1e-3))
    rebuilt = fb.build(copy, other, work=work, threads=1, log=lambda *_: None, parts=["t5"])
    assert {rel: d for rel, d in rebuilt["files"].items() if not rel.startswith("t5/")} == kept
    assert rebuilt["files"]["t5/pytorch_model.bin"] != manifest["files"]["t5/pytorch_model.bin"]
    assert fb.verify(copy, other)["recipe"]["t5"]["lr"] == 1e-3
    times = manifest["build_time_s"]
    assert rebuilt["build_time_s"]["total"] == pytest.approx(times["total"] - times["t5"] + rebuilt["build_time_s"]["t5"],
                                                             abs=0.11)
    with pytest.raises(fb.BackbonesError, match="another recipe than the parts kept"):
        fb.build(copy, dict(other, seed=1), work=work, parts=["t5"])
    with pytest.raises(fb.BackbonesError, match="the recipe's parts are"):
        fb.build(copy, other, work=work, parts=["lm"])
    with pytest.raises(SystemExit) as exit_info:
        fb.main(["--out", copy, "--work", work, "--parts", "t6"])
    assert exit_info.value.code == 2


def test_t5_runs_through_train_and_evaluate_with_the_demo_configs(backbones, tmp_path):
    """Stage 0 (pformer_t5, with the QA term), stage 1 with the T5 P-Former teacher, stage 2 (blip2_t5_pformer) and
    zero-shot VQA, from the configs run_configs writes with llm="t5"; and the teacher's ceiling."""
    from lavis_pformer.demo import pipeline
    from lavis_pformer.demo.run_configs import run_dir
    from lavis_pformer.demo.scheduler import run_jobs
    from lavis_pformer.demo.vqa_scores import vqa_type_metrics

    folder, work, _ = backbones
    ctx = {"out": str(tmp_path), "seed": 0, "scale": pipeline.SCALES["smoke"], "recipe": SMOKE,
           "world": os.path.join(work, "world"), "bert": os.path.join(folder, "bert"),
           "vit": os.path.join(folder, "vit.pth"), "t5": os.path.join(folder, "t5")}
    for key in ("configs", "logs", "runs", "data"):
        ctx[key] = str(tmp_path / key)
        os.makedirs(ctx[key])
    jobs, _ = pipeline.demo_jobs(ctx, ["pformer_qa"], llm="t5")
    run_jobs([j for j in jobs if not j.name.endswith("eval_caption")], 1, 1)
    last = {stage: json.loads(open(os.path.join(run_dir(ctx, f"pformer_qa_{stage}"), "log.txt")).read().splitlines()[-1])
            for stage in ("stage0", "stage1", "stage2")}
    assert {"train_loss_lm", "train_loss_qa"} <= set(last["stage0"]) and "train_loss_align" in last["stage1"]
    assert {"train_loss_lm", "train_loss_align"} <= set(last["stage2"])
    stage2 = torch.load(os.path.join(run_dir(ctx, "pformer_qa_stage2"), "checkpoint_last.pth"), weights_only=True)
    assert "t5_proj.weight" in stage2["model"] and stage2["model"]["_extra_state"]["aligned_to"]["llm_hidden_size"] == 32
    world = ctx["world"]
    questions = json.load(open(os.path.join(world, "vqa_val.json")))
    predictions = json.load(open(os.path.join(run_dir(ctx, "pformer_qa_eval_vqa"), "result", "val_vqa_result.json")))
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
    answers = json.load(open(os.path.join(world, "world.json")))["answers"]
    assert 0.0 <= vqa_type_metrics(predictions, questions, answers)["overall"] <= 1.0
    teacher = t5_eval.teacher_ceiling(os.path.join(run_dir(ctx, "pformer_qa_stage0"), "pformer.pth"), ctx["t5"], world,
                                      "val", bert_model=ctx["bert"])
    assert teacher["questions"] == len(questions) and 0.0 <= teacher["overall"] <= 1.0


def test_committed_t5_matches_its_manifest_and_its_ceiling(tmp_path):
    from lavis_pformer.demo import frozen_backbones as fb

    manifest = fb.verify(fb.COMMITTED, fb.RECIPE)
    assert {"t5/config.json", "t5/pytorch_model.bin", "t5/spiece.model", "t5/tokenizer.json"} <= set(manifest["files"])
    world = str(tmp_path / "world")  # the recipe's world; its val split does not depend on the corpus or ViT images
    shapes_world.generate(world, seed=fb.RECIPE["seed"], **dict(fb.RECIPE["world"], n_corpus=10, n_vision=0))
    tokenizer, model = t5_eval.load_t5(os.path.join(fb.COMMITTED, "t5"))
    ceiling = t5_eval.text_ceiling(model, tokenizer, world)
    recorded = manifest["quality"]["t5_text_ceiling_val"]
    assert {t: v["accuracy"] for t, v in ceiling["per_type"].items()} == recorded["caption_first"]
    assert ceiling["overall_excl_yesno"] == recorded["overall_excl_yesno"]
