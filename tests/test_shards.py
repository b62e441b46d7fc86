"""Webdataset shards (docs/data.md, ``image_text_shards``), in this process:

- the converter (``python -m lavis_pformer.datasets.to_shards``) writes img2dataset's layout from a captions file and
  an image folder: every record once, JPEG copied byte for byte, other images re-encoded (or kept), atomic shards,
  and refuses a folder that holds shards or an unreadable image (exit status 2, nothing half-written);
- ``ShardCaptionDataset``: a pass gives every sample once, shuffled; 2 ranks x 2 workers read disjoint shards that
  cover the set (webdataset's split by node, then by worker); a stream started from an item's position repeats no
  sample of the pass and skips at most the shuffle buffer (exactly nothing without a buffer);
- unreadable samples (no caption file, no image, an image that does not decode, a JSON without the caption) and a
  shard damaged in the middle are skipped, logged with the shard and counted, until the bound stops the stream with
  a DataError naming the shard;
- ``ShardIterLoader`` with 2 worker processes: each batch's reader position, and a loader restarted from its state;
- the builder's checks before training: a missing, empty, non-tar or file-less shard, a first sample without the
  configured caption or image file, and settings that cannot work, each a short error naming the shard and the fix.
"""
import collections
import io
import json
import logging
import os
import tarfile

import pytest
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

import lavis_pformer  # noqa: F401
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

from lavis_pformer.datasets import to_shards
from lavis_pformer.datasets.shard_samples import BadShare, SampleFormat
from lavis_pformer.datasets.shard_stream import POSITION, ShardCaptionDataset
from lavis_pformer.errors import ConfigError, DataError, MissingFileError
from lavis_pformer.iter_loaders import ShardIterLoader


def convert(tiny, out, shard_size=8, times=1, **kwargs):
    """The tiny world's 64 training pairs (repeated ``times`` times) as shards in ``out``; the storage pattern."""
    captions = os.path.join(tiny["world"], "captions_train.json")
    if times > 1:
        records = json.load(open(captions)) * times
        captions = os.path.join(os.path.dirname(str(out)), f"captions_x{times}.json")
        json.dump(records, open(captions, "w"))
    pattern, n, count = to_shards.convert([captions], tiny["world"], str(out), shard_size=shard_size, **kwargs)
    assert (n, count) == (64 * times, -(-64 * times // shard_size))
    return pattern


def jpeg(color=(200, 30, 30)):
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, format="JPEG")
    return out.getvalue()


def write_shard(path, samples):
    """A shard of ``samples`` (dicts of extension -> bytes / str / dict, with ``__key__``)."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def good(key, caption="a red square"):
    return {"__key__": key, "jpg": jpeg(), "txt": caption}


def dataset(shards, buffer=0, share=0.01, window=1000, **fmt):
    return ShardCaptionDataset(shards, BlipImageEvalProcessor(image_size=16), BlipCaptionProcessor(),
                               SampleFormat(**fmt), BadShare(share, window), shuffle_buffer=buffer, label="test")


def take(ds, n):
    stream = iter(ds)
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# the converter


def test_converter_writes_img2dataset_layout(tiny, tmp_path, capsys):
    assert to_shards.main(["--captions", os.path.join(tiny["world"], "captions_train.json"), "--images", tiny["world"],
                           "--out", str(tmp_path / "shards"), "--shard-size", "24"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["wrote 64 samples in 3 shard(s)", f"storage: {tmp_path}/shards/{{00000..00002}}.tar"]
    shards = wds.shardlists.expand_urls(out.split("storage: ")[1].strip())
    assert sorted(os.listdir(tmp_path / "shards")) == ["00000.tar", "00001.tar", "00002.tar"]  # no temporary file left
    records = json.load(open(os.path.join(tiny["world"], "captions_train.json")))
    samples = [s for shard in shards for s in wds.tarfile_samples([{"url": shard}])]
    assert [len(list(wds.tarfile_samples([{"url": s}]))) for s in shards] == [24, 24, 16]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(64)]
    for sample, record in zip(samples, records):
        assert sorted(k for k in sample if not k.startswith("__")) == ["jpg", "json", "txt"]
        assert sample["txt"].decode() == record["caption"]
        assert json.loads(sample["json"]) == {"caption": record["caption"], "image": record["image"],
                                              "key": sample["__key__"]}
        with Image.open(io.BytesIO(sample["jpg"])) as img:  # the world's PNGs, re-encoded as JPEG
            assert img.format == "JPEG" and img.size == Image.open(os.path.join(tiny["world"], record["image"])).size


def test_converter_copies_jpeg_and_keeps_other_formats_on_request(tiny, tmp_path):
    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)
    (world / "images" / "a.jpg").write_bytes(jpeg())
    Image.new("RGB", (8, 8), (0, 90, 0)).save(world / "images" / "b.png")
    json.dump([{"image": "images/a.jpg", "caption": "one", "image_id": 1},
               {"image": "images/b.png", "caption": "two", "image_id": 2}], open(world / "c.json", "w"))
    pattern, _, _ = to_shards.convert([str(world / "c.json")], str(world), str(tmp_path / "keep"), image_format="keep")
    a, b = wds.tarfile_samples([{"url": pattern}])
    assert a["jpg"] == jpeg() and b["png"] == (world / "images" / "b.png").read_bytes() and "jpg" not in b


def test_converter_refuses_used_folder_and_unreadable_image(tiny, tmp_path, capsys):
    captions = os.path.join(tiny["world"], "captions_train.json")
    args = ["--captions", captions, "--images", tiny["world"], "--out", str(tmp_path / "s")]
    assert to_shards.main(args) == 0
    assert to_shards.main(args) == 2
    assert "already holds shards (00000.tar, 1 in all): choose an empty folder" in capsys.readouterr().err
    world = tmp_path / "world"
    os.symlink(tiny["world"], world)
    records = json.load(open(captions))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records[20]["image"] = str(broken)
    json.dump(records, open(tmp_path / "bad.json", "w"))
    code = to_shards.main(["--captions", str(tmp_path / "bad.json"), "--images", str(world), "--out",
                           str(tmp_path / "t"), "--shard-size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and f"image file {broken} cannot be read as an image" in err
    assert sorted(os.listdir(tmp_path / "t")) == ["00000.tar"]  # the complete shard before it, nothing half-written


# ---------------------------------------------------------------------------------------------------------
# the stream


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory):
    """The tiny world's 64 pairs in 8 shards of 8."""
    return wds.shardlists.expand_urls(convert(tiny, tmp_path_factory.mktemp("shards") / "s"))


def test_a_pass_gives_every_sample_once_shuffled(shards):
    items = take(dataset(shards), 64)
    ids = [i["instance_id"] for i in items]
    assert len(set(ids)) == 64 and {i[POSITION]["pass"] for i in items} == {0}
    assert ids != sorted(ids)  # the shard order is shuffled
    assert items[0]["image"].shape == (3, 16, 16) and isinstance(items[0]["text_input"], str)
    assert ids == [i["instance_id"] for i in take(dataset(shards), 64)]  # seeded: the same stream again
    next_pass = [i["instance_id"] for i in take(dataset(shards), 128)[64:]]
    assert sorted(next_pass) == sorted(ids) and next_pass != ids  # every pass in its own order


def test_the_shuffle_buffer_mixes_samples_and_keeps_their_counts(shards):
    """Across passes (the buffer carries samples from one into the next) every sample comes out once per pass."""
    items = take(dataset(shards, buffer=16), 640)
    counts = collections.Counter(i["instance_id"] for i in items)
    assert len(counts) == 64 and min(counts.values()) >= 9 and max(counts.values()) <= 11
    keys = [int(i["instance_id"].split("/")[1]) for i in items[:64]]
    assert any(abs(a - b) > 8 for a, b in zip(keys, keys[1:]))  # neighbours from different shards


def test_ranks_and_workers_read_disjoint_shards(shards, monkeypatch):
    read = {}
    for rank in range(2):
        for worker in range(2):  # what webdataset's splitters see in DataLoader worker `worker` of rank `rank`
            for key, value in {"RANK": rank, "WORLD_SIZE": 2, "WORKER": worker, "NUM_WORKERS": 2}.items():
                monkeypatch.setenv(key, str(value))
            items = take(dataset(shards), 16)
            read[rank, worker] = {i["instance_id"].split("/")[0] for i in items}
            assert {i[POSITION]["worker"] for i in items} == {worker}
    names = [os.path.basename(s) for s in shards]
    assert read == {(r, w): set(names[r::2][w::2]) for r in range(2) for w in range(2)}


@pytest.mark.parametrize("buffer", [0, 5])
@pytest.mark.parametrize("stop", [1, 13, 40, 58])
def test_a_stream_restarted_from_a_position_repeats_nothing(shards, buffer, stop):
    """Items given out before ``stop`` (all read in pass 0), then a stream started from the last one's position."""
    ids = lambda items: [i["instance_id"] for i in items]  # noqa: E731
    reference = take(dataset(shards, buffer=buffer), 150)
    before, position = reference[:stop], reference[stop - 1][POSITION]
    assert position["pass"] == 0
    resumed = dataset(shards, buffer=buffer)
    resumed.start = [position]
    after = take(resumed, 150 - stop)
    same_pass = ids(i for i in after if i[POSITION]["pass"] == 0)  # read in pass 0 too
    assert not set(ids(before)) & set(same_pass)  # nothing given out before is read again in the pass
    skipped = position["read"] - stop  # read into the shuffle buffer, never given out
    assert 0 <= skipped <= buffer
    assert len(set(ids(before)) | set(same_pass)) >= 64 - skipped - buffer  # the rest of the pass comes out
    if buffer == 0:  # no buffer: the restarted stream is the uninterrupted one
        assert skipped == 0 and ids(after) == ids(reference[stop:])


def test_unreadable_samples_are_counted_logged_and_bounded(tmp_path, caplog):
    bad_json = {"__key__": "j", "jpg": jpeg(), "json": b"{not json"}
    shard = write_shard(tmp_path / "mixed.tar", [
        good("a"), {"__key__": "b", "jpg": jpeg()}, {"__key__": "c", "txt": "no image"},
        {"__key__": "d", "jpg": b"\xff\xd8 broken", "txt": "broken image"}, good("e"), good("f")])
    with caplog.at_level(logging.WARNING):
        items = take(dataset([shard], share=0.75, window=4), 6)
    assert [i["instance_id"] for i in items[:3]] == ["mixed.tar/a", "mixed.tar/e", "mixed.tar/f"]
    assert {k: items[2][POSITION][k] for k in ("read", "bad_samples", "opened", "bad_shards")} == \
        {"read": 6, "bad_samples": 3, "opened": 1, "bad_shards": 0}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) >= 3
    assert "test rank 0 worker 0: skipped an unreadable sample (1 so far of 2 read): shard" in logged[0]
    assert "mixed.tar, sample b: no caption file .txt; its files: ['jpg']" in logged[0]
    assert "sample c: no image file (.jpg / .jpeg / .png / .webp); its files: ['txt']" in logged[1]
    assert "sample d: its image does not decode" in logged[2]
    with pytest.raises(DataError) as e:  # 25 % over a window of 4 allows 1
        take(dataset([shard], share=0.25, window=4), 3)
    assert "test rank 0 worker 0: 2 of the 3 samples read so far are unreadable" in str(e.value)
    assert "mixed.tar, sample c: no image file" in str(e.value)
    assert "raise test.build_info.max_bad_share" in str(e.value)
    json_shard = write_shard(tmp_path / "json.tar", [bad_json, {"__key__": "k", "jpg": jpeg(), "json": {"text": "x"}},
                                                     {"__key__": "l", "jpg": jpeg(), "json": {"caption": "ok"}}])
    with caplog.at_level(logging.WARNING):
        item, = take(dataset([json_shard], share=0.9, window=10, caption_key="json"), 1)
    assert item["text_input"] == "ok"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert ".json is not valid JSON" in messages and ".json has no 'caption' string (its keys: ['text'])" in messages


def test_a_shard_damaged_in_the_middle_is_counted(tmp_path, caplog):
    whole = write_shard(tmp_path / "whole.tar", [good(f"w{i}") for i in range(4)])
    cut = write_shard(tmp_path / "cut.tar", [good(f"c{i}") for i in range(6)])
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    with caplog.at_level(logging.WARNING):
        items = []
        for item in dataset([whole, cut], share=0.5):  # one bad shard of 2 (then of 3) is within 50 %
            items.append(item)
            if item[POSITION]["bad_shards"]:
                break
    from_cut = {i["instance_id"] for i in items if i["instance_id"].startswith("cut")}
    assert from_cut and len(from_cut) < 6  # the samples before the damage are kept
    assert any("could not read the rest of shard " + cut in r.getMessage() for r in caplog.records)
    assert items[-1][POSITION]["bad_shards"] == 1 and len(items) <= 10
    with pytest.raises(DataError, match=f"2 of the 4 shards opened so far could not be read to the end .* shard {cut}"):
        take(dataset([cut, whole], share=0.25), 20)  # one bad shard in the first 4 is allowed, not a second


def test_a_pass_without_any_sample_stops_the_stream(tmp_path):
    gone = str(tmp_path / "gone.tar")  # checked before training, deleted since
    with pytest.raises(DataError, match="test rank 0 worker 0: a whole pass over its 1 shard\\(s\\) gave no sample"):
        take(dataset([gone], share=0.5), 1)


def test_shard_loader_tracks_each_worker_and_restarts_from_its_state(shards):
    loader = ShardIterLoader(dataset(shards, buffer=4), batch_size=4, num_workers=2, seed=3)
    batches = [next(loader) for _ in range(6)]
    assert all(POSITION not in b and b["image"].shape == (4, 3, 16, 16) for b in batches)
    assert [p["worker"] for p in loader.positions] == [0, 1]
    assert [p["read"] >= 12 for p in loader.positions] == [True, True]
    state = json.loads(json.dumps(loader.state()))  # plain values, as in a checkpoint
    later = [next(loader) for _ in range(4)]
    resumed = ShardIterLoader(dataset(shards, buffer=4), batch_size=4, num_workers=2, seed=3)
    assert resumed.load_state(state)
    again = [next(resumed) for _ in range(4)]
    seen = {i for b in batches for i in b["instance_id"]}
    assert not seen & {i for b in again for i in b["instance_id"]}  # all still in pass 0 of each worker
    assert {i for b in later for i in b["instance_id"]} - seen
    assert not resumed.load_state({"kind": "shards", "readers": [None]})  # another number of workers: starts again


# ---------------------------------------------------------------------------------------------------------
# the builder's checks


def build(storage, **info):
    cfg = OmegaConf.create({"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 16}},
                            "build_info": {"storage": storage, **info}})
    return registry.get_builder_class("image_text_shards")(cfg).build_datasets()


def test_builder_builds_the_stream(shards):
    pattern = os.path.join(os.path.dirname(shards[0]), "{00000..00007}.tar")
    built = build(pattern, shuffle_buffer=4)["train"]
    assert isinstance(built, ShardCaptionDataset) and built.shards == shards and built.shuffle_buffer == 4
    item = next(iter(built))
    assert item["image"].shape == (3, 16, 16)


def test_bad_shards_are_named_before_training(shards, tmp_path):
    folder = os.path.dirname(shards[0])
    with pytest.raises(MissingFileError) as e:
        build(os.path.join(folder, "{00000..00009}.tar"))
    assert "2 of the 10 shards do not exist: " + os.path.join(folder, "00008.tar") in str(e.value)
    assert "Fix datasets.image_text_shards.build_info.storage" in str(e.value)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_text("a caption file, not a tar\n" * 40)
    (tmp_path / "blank.tar").write_bytes(b"\0" * 10240)
    with pytest.raises(DataError) as e:
        build([shards[0], str(tmp_path / "{empty,text,blank}.tar")])
    message = str(e.value)
    assert "3 of the 4 shards cannot be used" in message
    assert f"{tmp_path}/empty.tar is empty (0 bytes)" in message and f"{tmp_path}/text.tar is not a tar archive" in message
    assert f"{tmp_path}/blank.tar is a tar archive without any file" in message
    assert "Remove them from datasets.image_text_shards.build_info.storage, or rewrite them" in message


def test_wrong_caption_or_image_key_is_named_before_training(shards, tmp_path):
    with pytest.raises(DataError) as e:
        build(shards[0], caption_key="cls")
    assert f"sample 000000000 of {shards[0]} (the first one) cannot be used: no caption file .cls; its files: " \
           "['jpg', 'json', 'txt']" in str(e.value)
    assert "set datasets.image_text_shards.build_info.image_key / caption_key" in str(e.value)
    with pytest.raises(DataError, match="no image file \\(.png\\)"):
        build(shards[0], image_key="png")
    assert build(shards[0], caption_key="json")["train"].sample_format.caption_key == "json"


@pytest.mark.parametrize("info,message", [
    ({"storage": None}, "set datasets.image_text_shards.build_info.storage to the shards"),
    ({"storage": "https://host/{0..9}.tar"}, "is not a local path"),
    ({"storage": ["a.tar", "a.tar"]}, "lists the shard .*a.tar twice"),
    ({"max_bad_share": 1.5}, "max_bad_share must be a number in \\[0, 1\\)"),
    ({"bad_share_window": 0}, "bad_share_window must be a positive integer"),
    ({"shuffle_buffer": -1}, "shuffle_buffer must be an integer >= 0"),
])
def test_settings_that_cannot_work(shards, info, message):
    with pytest.raises(ConfigError, match=message):
        build(**{"storage": shards[0], **info})


def test_too_few_shards_for_the_readers(shards):
    ds = build(shards[:3])["train"]
    ds.check_split(1, 3)
    with pytest.raises(ConfigError, match=r"3 shard\(s\) cannot give each of the 2 rank\(s\) x 2 DataLoader worker"):
        ds.check_split(2, 2)


def test_bound_arithmetic():
    bound = BadShare(0.01, 1000)
    assert [bound.samples_allowed(n) for n in (0, 500, 1000, 5000)] == [10, 10, 10, 50]
    assert [bound.shards_allowed(n) for n in (1, 100, 250)] == [1, 1, 2]
    strict = BadShare(0, 10)
    assert strict.samples_allowed(10 ** 6) == strict.shards_allowed(50) == 0
    bound.check_samples(10, 10, "w", "last", "fix")
    with pytest.raises(DataError, match="w: 11 of the 11 samples read so far are unreadable .* the latest: last. fix"):
        bound.check_samples(11, 11, "w", "last", "fix")


def test_tar_header_check_reads_compressed_shards(tmp_path):
    path = tmp_path / "s.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = jpeg()
        info = tarfile.TarInfo("k.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        text = b"a caption"
        info = tarfile.TarInfo("k.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    item = next(iter(build(str(path))["train"]))
    assert item["instance_id"] == "s.tar.gz/k" and item["text_input"] == "a caption"
