"""Compact storage of caption annotations (lavis_pformer.datasets.compact), the train split of ``local_caption``.

- Items are LAVIS's: the same image, processed caption and image_id index as LAVIS's own CaptionDataset on the
  same files (repeated and mixed-type image ids, non-ASCII captions, several files, a JSON-lines file).
- No Python object per record: building 20,000 records adds a bounded number of objects to the garbage
  collector's view (LAVIS's dataset adds one dict and its strings per record), and the arrays hold
  (path + caption bytes + 12) per record.
- The batched reader: records across batch and chunk boundaries, odd whitespace, empty lists, and malformed
  files as DataError naming the entry, the line or the byte.
The memory per process at 4M pairs with 2 ranks x 2 workers is measured by bench/bench_annotations_memory.py.
"""
import gc
import json
import os
import random

import pytest
import torch

import lavis_pformer.datasets.compact as compact
import lavis_pformer.datasets.json_batches as json_batches
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor
from lavis_pformer.datasets.compact import CompactCaptions
from lavis_pformer.datasets.local_image_text import LocalCaptionDataset
from lavis_pformer.errors import DataError

CAPTIONS = ["a red circle", "deux carrés bleus à gauche", "a cat 🐈 on a mat", "", "  spaced   words  "]


def write_records(tiny, tmp_path, n=40, seed=0):
    """Two annotation files (a JSON list and JSON lines) over the tiny world's images, with repeated int and str
    image ids."""
    rng = random.Random(seed)
    world = tiny["world"]
    images = sorted(r["image"] for r in json.load(open(os.path.join(world, "captions_train.json"))))
    records = [{"image": rng.choice(images[:8]), "caption": rng.choice(CAPTIONS) + f" {i}",
                "image_id": rng.choice([3, 7, "7", "img-a", 11, 3]), "extra": [i]} for i in range(n)]
    first, second = tmp_path / "part1.json", tmp_path / "part2.jsonl"
    first.write_text(json.dumps(records[: n // 2], indent=2, ensure_ascii=False))
    second.write_text("\n".join(json.dumps(r) for r in records[n // 2:]) + "\n\n")
    lavis_second = tmp_path / "part2_as_list.json"  # LAVIS reads JSON lists only
    lavis_second.write_text(json.dumps(records[n // 2:]))
    return world, [str(first), str(second)], [str(first), str(lavis_second)]


@pytest.mark.parametrize("batch", [1, 3, 1 << 16])  # batches of one id type each, mixed, all records in one
def test_items_are_those_of_lavis_caption_dataset(tiny, tmp_path, monkeypatch, batch):
    monkeypatch.setattr(json_batches, "BATCH", batch)
    world, ours_paths, lavis_paths = write_records(tiny, tmp_path)
    vis, text = BlipImageEvalProcessor(image_size=32), BlipCaptionProcessor(max_words=50)
    ours = LocalCaptionDataset(vis, text, world, ours_paths)
    stock = CaptionDataset(vis, text, world, lavis_paths)
    assert len(ours) == len(stock) == 40
    for i in range(len(stock)):
        a, b = ours[i], stock[i]
        assert a.keys() == b.keys() and a["text_input"] == b["text_input"] and a["image_id"] == b["image_id"], i
        assert torch.equal(a["image"], b["image"]), i
        assert ours.annotation[i]["image"] == stock.annotation[i]["image"]
        assert ours.annotation[i]["caption"] == stock.annotation[i]["caption"]
    assert ours.records.num_images == len(stock.img_ids)
    batch = ours.collater([ours[0], ours[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image_id"].tolist() == [ours[0]["image_id"], ours[1]["image_id"]]


def test_no_python_object_per_record(tmp_path):
    n = 20000
    path = tmp_path / "big.json"
    records = [{"image": f"images/{i % 5000:06d}.jpg", "caption": f"caption number {i} of the set",
                "image_id": i % 5000} for i in range(n)]
    path.write_text(json.dumps(records))
    text_bytes = sum(len(r["image"]) + len(r["caption"]) for r in records)
    del records
    gc.collect()
    before = len(gc.get_objects())
    store = CompactCaptions([str(path)])
    gc.collect()
    assert len(gc.get_objects()) - before < 100  # LAVIS's list of dicts: > n
    assert len(store) == n and store.num_images == 5000 and store.num_image_files() == 5000
    assert store.nbytes() == text_bytes + 12 * n + 8  # buffers + uint32 offsets [n + 1] x 2 + int32 index
    assert store.image(12345) == "images/002345.jpg" and store.caption(12345) == "caption number 12345 of the set"
    assert int(store.image_index[12345]) == 2345  # ids numbered by first appearance


@pytest.mark.parametrize("batch,chunk", [(1, 1), (7, 13), (64, 1 << 20)])
def test_batches_across_boundaries(tmp_path, monkeypatch, batch, chunk):
    """Records decoded a few at a time (json_batches.BATCH) and JSON lines read a few bytes at a time
    (LINE_CHUNK): the same records, in order, with a BOM, odd whitespace and nested values."""
    monkeypatch.setattr(json_batches, "BATCH", batch)
    monkeypatch.setattr(json_batches, "LINE_CHUNK", chunk)
    records = [{"image": f"i{i}.png", "caption": CAPTIONS[i % len(CAPTIONS)] * (i % 3 + 1), "image_id": i,
                "nested": {"a": [1, 2, {"b": "]},"}]}} for i in range(25)]
    path = tmp_path / "a.json"
    path.write_text("\ufeff \n [\n" + " ,\n\t".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in
                                                    enumerate(records)) + "\n ]  \n", encoding="utf-8")
    lines = tmp_path / "a.jsonl"
    lines.write_text("\ufeff" + "\n\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    for store in (CompactCaptions([str(path)]), CompactCaptions([str(lines)])):
        assert [store.caption(i) for i in range(len(store))] == [r["caption"] for r in records]
        assert [store.image(i) for i in range(len(store))] == [r["image"] for r in records]
        assert store.image_index.tolist() == list(range(25))
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert len(CompactCaptions([str(tmp_path / "empty.json")])) == 0


@pytest.mark.parametrize("content,message", [
    ('[{"image": "a", "caption": "b", "image_id": 1}, {"image": "a", "caption": "b"',
     r"is not valid JSON \(the file ends inside the list: it is cut short\)"),
    ('[{"image": "a", "caption": "b", "image_id": 1}\n {"image": "a"}]',
     r"is not valid JSON \(line 2, column 2 \(byte 48\): expected ',' or ']'\)"),
    ('[{"image": "a", "caption": "b", "image_id": 1}] [', r"line 1, column 50 \(byte 49\): trailing characters"),
    ('{"image": "a", "caption": "b", "image_id": 1}', "expected a JSON list of objects .* but it starts with '{'"),
    ('', "empty"),
    (' \n ', "empty"),
    ('[{"image": "a", "caption": "b"}]', r"entry 0: missing \['image_id'\]"),
    ('[{"image": "a", "caption": "b", "image_id": 1}, 3]', r"entry 1: missing \['image', 'caption', 'image_id'\]"),
    ('[{"image": 3, "caption": "b", "image_id": 1}]', "entry 0: image 3 is not a path string"),
    ('[{"image": "a", "caption": ["b"], "image_id": 1}]', r"entry 0: caption \['b'\] is not a string"),
    (b'[{"image": "a", "caption": "b", "image_id": 1}, {"image": "a", "caption": "\xff", "image_id": 1}]',
     "is not valid JSON \\(entry 1: Invalid UTF-8"),
])
def test_malformed_files_are_data_errors(tmp_path, monkeypatch, content, message):
    monkeypatch.setattr(json_batches, "BATCH", 1)
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        CompactCaptions([str(path)])


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a", "caption": "b", "image_id": 1}\n\n{"image": \n')
    with pytest.raises(DataError, match="line 3: not valid JSON"):
        CompactCaptions([str(path)])
    path.write_text('{"image": "a", "caption": "b", "image_id": 1}\n\n{"image": "a", "caption": 2, "image_id": 1}\n')
    with pytest.raises(DataError, match="entry 1: caption 2 is not a string"):
        CompactCaptions([str(path)])


@pytest.mark.parametrize("values", [[], [5], [1, 2, 3, 7], [4, 4, 2, 2, 2, 9], [3, 1, 3, 2, 1, 3], ["b", "a", "b"],
                                    ["a", "a", "c", "d"], list(range(50, 0, -1)) * 2])
def test_numbered_in_order_is_lavis_img_ids(values):
    """Runs, sorted heads (nothing hashed) or the dictionary encoding: the numbering of LAVIS's img_ids dict."""
    import pyarrow as pa

    ids = {}
    for v in values:
        ids.setdefault(v, len(ids))
    codes, count = compact.numbered_in_order(pa.array(values, pa.int64() if not values or isinstance(values[0], int)
                                                      else pa.string()))
    assert codes.tolist() == [ids[v] for v in values] and count == len(ids) and codes.dtype == "int32"


def test_image_files_counted_as_far_as_the_image_check_needs(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"image": f"{i % 300}.jpg", "caption": "c", "image_id": i} for i in range(1000)]))
    store = CompactCaptions([str(path)])
    assert 10 < store.num_image_files(up_to=10) < 300  # stopped early: more than 10 is all the check needs
    assert store.num_image_files(up_to=500) == 300 == store.num_image_files()
    assert store.image_files()[:3] == ["0.jpg", "1.jpg", "2.jpg"] and len(store.image_files()) == 300
