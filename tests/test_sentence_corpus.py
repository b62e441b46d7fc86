"""Tests of the text-only `sentence_corpus` dataset builder."""

import json
import logging
import os
import pickle

import numpy as np
import pytest
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lavis_pformer.datasets.json_batches as json_batches
from lavis_pformer.datasets.sentence_corpus import SentenceCorpusDataset

PROC = BlipCaptionProcessor(max_words=4)
RAW = ["A Dog, runs!", "Two cats: sleeping (on) a mat.", "ONE two three four five six"]
CLEAN = ["a dog, runs", "two cats sleeping on", "one two three four"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _texts(ds):
    return [ds[i]["text_input"] for i in range(len(ds))]


def _build(storage, **build_info):
    cfg = OmegaConf.create(
        {
            "text_processor": {"train": {"name": "blip_caption", "max_words": 4}},
            "build_info": {"annotations": {"train": {"storage": storage}}, **build_info},
        }
    )
    return registry.get_builder_class("sentence_corpus")(cfg).build_datasets()


@pytest.mark.parametrize(
    "name,content",
    [
        ("s.txt", "\n".join(RAW) + "\n"),
        ("s.jsonl", "\n".join(json.dumps({"caption": t}) for t in RAW)),
        ("s.ndjson", "\n".join(json.dumps({"text": t}) for t in RAW) + "\n"),
        ("s.json", json.dumps([{"caption": RAW[0]}, {"text": RAW[1]}, {"caption": RAW[2]}])),
        ("lines.json", "\n".join(json.dumps({"caption": t}) for t in RAW)),
        ("noext", json.dumps([{"caption": t} for t in RAW])),
        ("noext2", "\r\n".join(RAW)),
    ],
)
def test_formats_clean_like_blip_caption(tmp_path, name, content):
    ds = SentenceCorpusDataset(PROC, [_write(tmp_path / name, content)])
    assert _texts(ds) == CLEAN
    assert ds[1] == {"text_input": CLEAN[1], "instance_id": "1"}


@pytest.mark.parametrize("chunk,batch", [(1, 1), (7, 2), (1 << 20, 1 << 16)])
def test_chunks_and_batches_of_any_size(tmp_path, monkeypatch, chunk, batch):
    """Files read a few bytes (json_batches.LINE_CHUNK) and decoded a few records (BATCH) at a time: the same
    sentences, QA fields, blank counts and bad-line numbers."""
    monkeypatch.setattr(json_batches, "LINE_CHUNK", chunk)
    monkeypatch.setattr(json_batches, "BATCH", batch)
    txt = tmp_path / "a.txt"
    txt.write_bytes("\ufeffFirst one.\n\n  second ONE  \r\n".encode() + b"caf\xe9\nthird\n")
    jsonl = _write(tmp_path / "b.jsonl", '{"caption": "Q one", "question": "Why?", "answer": 3}\n\n{"text": 5}\n'
                                         '{"text": "plain"}\n')
    jsn = _write(tmp_path / "c.json", json.dumps([{"caption": "x y"}, {"caption": " "}, {"text": "z"}]))
    ds = SentenceCorpusDataset(PROC, [str(txt), jsonl, jsn], max_bad_lines=1)
    assert _texts(ds) == ["first one", "second one", "third", "q one", "plain", "x y", "z"]
    assert ds[3]["question"] == "why?" and ds[3]["answer"] == "3" and "question" not in ds[4]
    with pytest.raises(ValueError, match=r"a\.txt, line 4: not UTF-8"):
        SentenceCorpusDataset(PROC, [str(txt)])
    with pytest.raises(ValueError, match=r"b\.jsonl, line 3: expected a JSON object with a \"caption\" or \"text\" "
                                         r"string, got keys \['text'\]"):
        SentenceCorpusDataset(PROC, [jsonl])


def test_several_files_and_utf8_bom(tmp_path):
    a = _write(tmp_path / "a.txt", "\ufeffFirst one.\nsecond ONE\n")
    b = _write(tmp_path / "b.json", json.dumps([{"caption": "Caf\u00e9 au lait!"}]))
    c = _write(tmp_path / "c.jsonl", '{"text": "Last"}\n')
    ds = SentenceCorpusDataset(PROC, [a, b, c])
    assert _texts(ds) == ["first one", "second one", "caf\u00e9 au lait", "last"]
    assert [ds[i]["instance_id"] for i in range(4)] == ["0", "1", "2", "3"]
    with pytest.raises(IndexError):
        ds[4]


def test_blank_lines_skipped_and_logged(tmp_path, caplog):
    txt = _write(tmp_path / "a.txt", "one\n\n   \nTwo\n\t\n")
    jsn = _write(tmp_path / "b.json", json.dumps([{"caption": " "}, {"caption": "three"}]))
    with caplog.at_level(logging.INFO):
        ds = SentenceCorpusDataset(PROC, [txt, jsn])
    assert _texts(ds) == ["one", "two", "three"]
    assert f"skipped 3 blank lines in {txt}" in caplog.text
    assert f"skipped 1 blank lines in {jsn}" in caplog.text


@pytest.mark.parametrize("content", ["", "\n  \n\n", "[]", '[{"caption": "  "}]'])
def test_empty_file_is_error_naming_file(tmp_path, content):
    path = _write(tmp_path / ("e.json" if content.startswith("[") else "e.txt"), content)
    with pytest.raises(ValueError, match="contains no sentences") as err:
        SentenceCorpusDataset(PROC, [path])
    assert path in str(err.value)


def test_missing_file_is_error_naming_file(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="storage") as err:
        SentenceCorpusDataset(PROC, [path])
    assert path in str(err.value)


@pytest.mark.parametrize(
    "name,content",
    [
        ("bad.json", '[{"caption": "a"},'),
        ("bad.json", '{"annotations": [1, 2]}\n{"caption": "x"}'),
        ("bad.json", "caption: not json"),
        ("bad.json", '{"caption": "a"}'.replace("{", "[", 1)),
    ],
)
def test_bad_json_is_error_naming_file(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as err:
        SentenceCorpusDataset(PROC, [path])
    assert path in str(err.value)


def test_jsonl_bad_line_tolerance(tmp_path, caplog):
    lines = ['{"caption": "a b"}', "{not json", '{"caption": "c"}', '["no", "dict"]', '{"text": "d"}']
    path = _write(tmp_path / "x.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2: invalid JSON.*max_bad_lines") as err:
        SentenceCorpusDataset(PROC, [path])
    assert path in str(err.value)
    with pytest.raises(ValueError, match="line 4"):
        SentenceCorpusDataset(PROC, [path], max_bad_lines=1)
    with caplog.at_level(logging.INFO):
        ds = SentenceCorpusDataset(PROC, [path], max_bad_lines=2)
    assert _texts(ds) == ["a b", "c", "d"]
    assert f"skipped 2 bad lines in {path}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # mapped from the cache file: the same sentences and the same warning
        assert _texts(SentenceCorpusDataset(PROC, [path], max_bad_lines=2)) == ["a b", "c", "d"]
    assert f"skipped 2 bad lines in {path}" in caplog.text and "parsed in" not in caplog.text
    with pytest.raises(ValueError, match=r"line 2: invalid JSON.*max_bad_lines"):  # a stricter run parses again
        SentenceCorpusDataset(PROC, [path])


def test_storage_is_compact_not_list_of_dicts(tmp_path, annotation_cache):
    """Each file's stripped sentences are one UTF-8 buffer with int32 offsets, mapped from its cache file."""
    txt = _write(tmp_path / "a.txt", "one\n\n two \n")
    jsn = _write(tmp_path / "b.json", json.dumps([{"caption": "three"}, {"text": "four"}]))
    ds = SentenceCorpusDataset(PROC, [txt, jsn])
    lines, buf = ds.sources
    assert not hasattr(ds, "annotation")
    assert lines.text_buffer.dtype == np.uint8 and lines.text_buffer.tobytes() == b"onetwo"
    assert lines.text_offsets.dtype == np.int32 and lines.text_offsets.tolist() == [0, 3, 6]
    assert buf.text_buffer.tobytes() == b"threefour" and buf.text_offsets.tolist() == [0, 5, 9]
    assert not any(isinstance(v, list) for s in ds.sources for v in vars(s).values())
    assert all(os.path.dirname(s.table.path) == annotation_cache for s in ds.sources)
    assert not lines.text_buffer.flags.writeable  # a view of the read-only mapping, not a copy


def test_pickles_and_loads_with_two_workers(tmp_path):
    sentences = [f"Sentence number {i}." for i in range(40)]
    a = _write(tmp_path / "a.txt", "\n".join(sentences[:25]) + "\n")
    b = _write(tmp_path / "b.jsonl", "\n".join(json.dumps({"caption": s}) for s in sentences[25:]))
    ds = SentenceCorpusDataset(BlipCaptionProcessor(), [a, b])
    assert ds[0]["text_input"] == "sentence number 0"
    clone = pickle.loads(pickle.dumps(ds))
    assert b"number 7" not in pickle.dumps(ds)  # pickled as the cache files' paths, not the sentences
    assert _texts(clone) == _texts(ds)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=ds.collater)
    seen = {}
    for batch in loader:
        assert set(batch) == {"text_input", "instance_id"}
        seen.update(zip(batch["instance_id"], batch["text_input"]))
    assert seen == {str(i): f"sentence number {i}" for i in range(40)}


def test_builder_with_omegaconf_cfg(tmp_path):
    train = [_write(tmp_path / "t1.txt", "Hello there, World!\n"), _write(tmp_path / "t2.txt", "b\n")]
    val = _write(tmp_path / "v.jsonl", '{"caption": "A B C D E F"}\n')
    out = _build(train, max_bad_lines=0)
    assert set(out) == {"train"} and _texts(out["train"]) == ["hello there, world", "b"]
    cfg = OmegaConf.create(
        {"build_info": {"annotations": {"train": {"storage": train}, "val": {"storage": val}}}}
    )
    out = registry.get_builder_class("sentence_corpus")(cfg).build_datasets()
    assert _texts(out["val"]) == ["a b c d e f"]  # default eval processor: max_words 50


def test_builder_relative_paths_use_cwd(tmp_path):
    _write(tmp_path / "rel.txt", "Relative Path.\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ds = _build("rel.txt")["train"]
    finally:
        os.chdir(cwd)
    assert ds.paths == [str(tmp_path / "rel.txt")] and _texts(ds) == ["relative path"]


def test_builder_default_config_and_missing_storage():
    builder_cls = registry.get_builder_class("sentence_corpus")
    path = builder_cls.default_config_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    builder = builder_cls()
    assert builder.config.data_type == "text"
    with pytest.raises(ValueError, match="annotations.train.storage"):
        builder.build_datasets()
