"""The demo's tiny-LM trainer (lavis_pformer.demo.train_lm and its lm_* modules) on a tiny shapes world, in seconds."""
import json
import os
import random

import pytest
import torch

from lavis_pformer.demo import lm_data, lm_eval, lm_model
from lavis_pformer.demo.train_lm import train_lm
from lavis_pformer.synthetic import shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lm_world"))
    shapes_world.generate(root, seed=0, n_train=4, n_val=16, n_test=4, n_corpus=300, n_vision=0)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lm_out"))
    logs = []
    report = train_lm(world, out, steps=30, layers=1, width=32, heads=4, ffn=64, batch_size=16, lr=3e-3,
                        max_offset=4, log_every=10, log=logs.append)
    return out, report, logs


def test_files_and_lavis_loading(trained):
    from transformers import AutoTokenizer

    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

    out, report, _ = trained
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "lm_report.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(os.path.exists(os.path.join(out, n)) for n in ("pytorch_model.bin", "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(out, use_fast=False)
    model = OPTForCausalLM.from_pretrained(out)
    assert type(model).__module__ == "lavis.models.blip2_models.modeling_opt"
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1
    ids = tokenizer("a red circle.").input_ids
    assert ids[0] == tokenizer.bos_token_id == 2 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 1
    cfg = model.config
    assert cfg.word_embed_proj_dim == cfg.hidden_size == 32 and cfg.num_hidden_layers == 1
    assert cfg.vocab_size == len(tokenizer) == report["sizes"]["vocab_size"]
    # the saved weights are the trained ones: same logits through LAVIS's class and transformers'
    from transformers import OPTForCausalLM as HFOPT

    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, HFOPT.from_pretrained(out)(input_ids=x).logits, atol=1e-5)


def test_loss_decreases_and_report(trained):
    out, report, logs = trained
    with open(os.path.join(out, "lm_report.json")) as f:
        saved = json.load(f)
    assert saved["steps"] == report["steps"] == 30
    history = saved["loss_history"]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert saved["loss_first"] > history[-1]["loss"] and history[0]["loss"] > history[-1]["loss"]
    acc = saved["accuracy"]
    assert set(acc) == {"color", "shape", "count", "yesno"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert 0.0 <= saved["overall"] <= 1.0 and 0.0 <= saved["overall_excl_yesno"] <= 1.0
    assert saved["text_ceiling"]["questions"] == sum(v["questions"] for v in saved["text_ceiling"]["per_type"].values())
    context = saved["text_ceiling"]["context"]  # the caption before the bos, where the soft prompt goes
    assert context["questions"] == saved["text_ceiling"]["questions"] and 0.0 <= context["overall"] <= 1.0
    assert saved["time_s"]["train"] > 0 and saved["sizes"]["parameters"] > 0
    assert any("step 30/30" in line for line in logs)


def test_fast_forward_matches_opt(trained):
    from transformers import OPTForCausalLM as HFOPT

    out, _, _ = trained
    model = HFOPT.from_pretrained(out).eval()
    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    valid = torch.zeros(3, 9, dtype=torch.bool)
    for r, n in enumerate((9, 5, 1)):
        valid[r, :n] = True
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=valid.long()).logits
        fast = lm_model.fast_logits(model, ids, valid=valid)
        assert torch.allclose(fast[valid], ref[valid], atol=1e-5)
        # offsets: OPT with its position table shifted up by k rows sees the text at positions k, k+1, ...
        k = 3
        shifted = HFOPT.from_pretrained(out).eval()
        table = shifted.model.decoder.embed_positions.weight
        table.data[: table.shape[0] - k] = model.model.decoder.embed_positions.weight.data[k:]
        ref_k = shifted(input_ids=ids, attention_mask=valid.long()).logits
        fast_k = lm_model.fast_logits(model, ids, valid=valid, offsets=torch.full((3,), k))
        assert torch.allclose(fast_k[valid], ref_k[valid], atol=1e-5)
        assert not torch.allclose(fast_k[valid], fast[valid], atol=1e-3)
        select = valid.clone()
        select[:, 0] = False
        assert torch.allclose(lm_model.fast_logits(model, ids, valid=valid, select=select), ref[select], atol=1e-5)


def test_answer_weights_and_batches(world, tmp_path):
    with open(os.path.join(world, "corpus.txt")) as f:
        lines = [line.rstrip("\n") for line in f][:40]
    assert any(shapes_world.SEGMENT_SEP in line for line in lines) and any(shapes_world.SEGMENT_SEP not in line for line in lines)
    segments = [seg for line in lines for seg in line.split(shapes_world.SEGMENT_SEP)]
    tokenizer, bpe = lm_data.build_tokenizer(segments, str(tmp_path))
    ids, weights = lm_data.encode_corpus(lines, bpe, tokenizer)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    for line, seq, w in zip(lines, ids, weights):
        # every segment starts with the bos, as LAVIS tokenizes the text after a soft prompt; "\n" ends the line
        *context, text = line.split(shapes_world.SEGMENT_SEP)
        expected = [t for c in context for t in tokenizer(c).input_ids] + tokenizer(text + "\n").input_ids
        assert seq == expected == lm_data.encode_segments(tokenizer, line + "\n") and len(w) == len(seq)
        assert seq[-1] == newline and seq.count(lm_data.BOS_ID) == len(context) + 1
        weighted = tokenizer.decode([t for t, x in zip(seq, w) if x == lm_data.ANSWER_WEIGHT]).split()
        answers = [m.group(1).strip() for m in lm_data._ANSWER_RE.finditer(line)]
        assert weighted == answers
    inp, tgt, wgt, valid, offsets = next(lm_data.batches(ids, weights, 8, 3, random.Random(0)))
    assert inp.shape == tgt.shape == wgt.shape == valid.shape and inp.shape[0] == 8 and offsets.shape == (8,)
    assert ((offsets >= 0) & (offsets <= 3)).all()
    for r in range(8):
        n = int(valid[r].sum())
        assert valid[r, :n].all() and not valid[r, n:].any()  # right padding only
        assert inp[r, 0] == lm_data.BOS_ID and (wgt[r, :n] > 0).all() and (wgt[r, n:] == 0).all()
        assert (tgt[r, : n - 1] == inp[r, 1:n]).all()


def test_clean_answer():
    assert lm_eval.clean_answer(" green.\nQuestion") == "green"
    assert lm_eval.clean_answer(" 3\n") == "3"
    assert lm_eval.clean_answer(" red. Question:") == "red"
