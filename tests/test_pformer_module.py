"""PFormer module, its strict checkpoint format, and the reference-weights converter (tiny in-memory BERT)."""
import logging

import pytest
import torch
import transformers

from lavis_pformer.convert_reference import ReferenceConversionError, convert_reference_state_dict, main
from lavis_pformer.pformer import CHECKPOINT_FORMAT, PFormer, PFormerCheckpointError

Q, H_LLM, EMBED, LLM = 5, 24, 16, "facebook/opt-tiny"


def tiny_config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)


def tiny_pformer(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(num_query_token=Q, llm_hidden_size=H_LLM, llm_name=LLM, embed_dim=EMBED, bert_model="tiny-bert")
    args.update(kw)
    return PFormer(tiny_config(), **args)


def batch(b=3, length=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


def assert_same_outputs(m1, m2):
    m1.eval(), m2.eval()
    ids, mask = batch()
    with torch.no_grad():
        o1, o2 = m1(ids, mask), m2(ids, mask)
    assert torch.equal(o1.prompt, o2.prompt)
    assert torch.equal(o1.text_feat, o2.text_feat)


def test_prompt_shape_independent_of_text_length():
    model = tiny_pformer().eval()
    ids, mask = batch(b=3, length=11)
    out = model(ids, mask)
    assert out.prompt.shape == (3, Q, H_LLM)
    assert out.text_feat.shape == (3, EMBED)
    torch.testing.assert_close(out.text_feat.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.prompt_from_cls(model.encode(ids, mask)), out.prompt)
    assert model(*batch(b=2, length=4)).prompt.shape == (2, Q, H_LLM)


def test_temperature_is_clamped():
    model = tiny_pformer()
    assert model.temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(2.0)
    assert model.temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(1e-5)
    assert model.temperature().item() == pytest.approx(0.001)


def test_save_load_roundtrip(tmp_path):
    model = tiny_pformer()
    path = tmp_path / "pformer.pth"
    model.save(str(path))
    assert not (tmp_path / "pformer.pth.tmp").exists()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    assert raw["meta"]["num_query_token"] == Q and raw["meta"]["llm_hidden_size"] == H_LLM
    loaded = PFormer.load(str(path), num_query_token=Q, llm_hidden_size=H_LLM, llm_name=LLM)
    assert loaded.metadata == model.metadata
    assert_same_outputs(model, loaded)


def test_from_bert_local_dir(tmp_path):
    torch.manual_seed(3)
    bert = transformers.BertModel(tiny_config(), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    model = PFormer.from_bert(str(tmp_path / "bert"), Q, H_LLM, LLM, embed_dim=EMBED)
    assert model.bert_model == str(tmp_path / "bert")
    for key, value in bert.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def _saved(tmp_path, edit=None):
    path = tmp_path / "pformer.pth"
    tiny_pformer().save(str(path))
    if edit is not None:
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    return str(path)


def _load_error(path, **expected):
    with pytest.raises(PFormerCheckpointError) as info:
        PFormer.load(path, **expected)
    return str(info.value)


def test_load_missing_file(tmp_path):
    msg = _load_error(str(tmp_path / "nope.pth"))
    assert "does not exist" in msg and "model.pformer_checkpoint" in msg and "convert_reference" in msg
    assert "nope.pth" in msg


def test_load_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    msg = _load_error(path)
    assert "cannot be read" in msg and path in msg


def test_load_lavis_training_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": tiny_pformer().state_dict(), "optimizer": {}, "epoch": 3}, path)
    msg = _load_error(str(path))
    assert "LAVIS training checkpoint" in msg and "pformer.pth" in msg


def test_load_reference_checkpoint_points_to_converter(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"model": {"Pformer.temp": torch.tensor(0.07)}}, path)
    assert "convert_reference" in _load_error(str(path))


def test_load_missing_tensor(tmp_path):
    path = _saved(tmp_path, lambda c: c["state_dict"].pop("prompt_head.0.weight"))
    msg = _load_error(path)
    assert "missing" in msg and "prompt_head.0.weight" in msg


def test_load_unexpected_tensor(tmp_path):
    path = _saved(tmp_path, lambda c: c["state_dict"].update(extra=torch.zeros(1)))
    msg = _load_error(path)
    assert "unexpected" in msg and "extra" in msg


def test_load_wrong_shape(tmp_path):
    path = _saved(tmp_path, lambda c: c["state_dict"].update({"text_proj.weight": torch.zeros(EMBED, 7)}))
    msg = _load_error(path)
    assert "wrong shape" in msg and "text_proj.weight" in msg and "(16, 7)" in msg


@pytest.mark.parametrize("key, value", [("num_query_token", Q + 1), ("llm_hidden_size", 2 * H_LLM),
                                        ("llm_name", "google/flan-t5-xl")])
def test_load_expected_mismatch(tmp_path, key, value):
    msg = _load_error(_saved(tmp_path), **{key: value})
    original = {"num_query_token": Q, "llm_hidden_size": H_LLM, "llm_name": LLM}[key]
    assert key in msg and repr(value) in msg and repr(original) in msg
    assert "stage 0" in msg


# ---- converter ----

def reference_layout(model, prefix="Pformer.", proj="opt_proj", bert_infix=True):
    """Rename a PFormer state dict into the authors' layout, plus keys the converter must ignore or drop."""
    rename = {"query_proj.": "cls_proj.", "prompt_head.0.": "pooler.0.", "llm_proj.": f"{proj}.",
              "text_proj.": "text_proj.", "encoder.": "bert." if bert_infix else ""}
    sd = {}
    for key, value in model.state_dict().items():
        for ours, theirs in rename.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        sd[prefix + key] = value.clone()
    hidden = model.bert_config.hidden_size
    sd[prefix + ("bert.pooler.dense.weight" if bert_infix else "pooler.dense.weight")] = torch.zeros(hidden, hidden)
    sd[prefix + "cls.predictions.bias"] = torch.zeros(100)
    sd["Qformer.x"] = torch.zeros(2)
    sd["vision_proj.weight"] = torch.zeros(2, 2)
    return sd


def test_convert_reference_layout(caplog):
    source = tiny_pformer(seed=5)
    with caplog.at_level(logging.INFO, logger="lavis_pformer.convert_reference"):
        model = convert_reference_state_dict(reference_layout(source), tiny_config(), Q, LLM, "tiny-bert")
    assert "ignored 2 key(s)" in caplog.text and "dropped 2" in caplog.text
    assert model.metadata == source.metadata
    assert_same_outputs(source, model)


def test_convert_darkformer_t5_without_bert_infix():
    source = tiny_pformer(seed=6, llm_name="google/flan-t5-tiny")
    sd = reference_layout(source, prefix="Darkformer.", proj="t5_proj", bert_infix=False)
    del sd["Darkformer.embeddings.position_ids"]
    model = convert_reference_state_dict(sd, tiny_config(), Q, "google/flan-t5-tiny", "tiny-bert")
    assert model.llm_hidden_size == H_LLM
    assert_same_outputs(source, model)


def test_convert_unplaceable_key():
    sd = reference_layout(tiny_pformer())
    sd["Pformer.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ReferenceConversionError, match=r"Pformer\.mystery\.weight"):
        convert_reference_state_dict(sd, tiny_config(), Q, LLM, "tiny-bert")


def test_convert_wrong_num_query_token():
    with pytest.raises(ReferenceConversionError, match="num-query-token"):
        convert_reference_state_dict(reference_layout(tiny_pformer()), tiny_config(), Q + 1, LLM, "tiny-bert")


def test_convert_main_end_to_end(tmp_path):
    source = tiny_pformer(seed=7)
    src, out, cfg = tmp_path / "ref.pth", tmp_path / "out" / "pformer.pth", tmp_path / "config.json"
    out.parent.mkdir()
    torch.save({"model": reference_layout(source), "optimizer": {}, "epoch": 4}, src)
    tiny_config().to_json_file(cfg)
    main(["--src", str(src), "--out", str(out), "--llm-name", LLM, "--num-query-token", str(Q),
          "--bert-model", "tiny-bert", "--bert-config", str(cfg)])
    loaded = PFormer.load(str(out), num_query_token=Q, llm_hidden_size=H_LLM, llm_name=LLM)
    assert_same_outputs(source, loaded)


def test_convert_main_reports_error(tmp_path, capsys):
    src, cfg = tmp_path / "ref.pth", tmp_path / "config.json"
    torch.save({"model": {"Qformer.x": torch.zeros(1)}}, src)
    tiny_config().to_json_file(cfg)
    with pytest.raises(SystemExit) as info:
        main(["--src", str(src), "--out", str(tmp_path / "o.pth"), "--llm-name", LLM, "--num-query-token", str(Q),
              "--bert-model", "tiny-bert", "--bert-config", str(cfg)])
    assert info.value.code == 2
    assert "Pformer." in capsys.readouterr().err
