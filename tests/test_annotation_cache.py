"""The annotation cache (lavis_pformer.datasets.arrow_cache) under the caption and sentence datasets.

- A later start maps the cache file instead of parsing; a source whose size or mtime changed is parsed again.
- Processes that start together parse once (the others wait on the lock) and read the same records.
- A build that fails, or a builder killed halfway, leaves no file that a reader would take; the next start builds.
- An unreadable cache file is rebuilt; a folder that cannot be used is a warning (the data are parsed without a
  cache); a full disk, a bad setting, and a cache rebuilt under a running job's pickled dataset are clear errors.
- The builders replay what the parse logged (blank captions) when they map the file.
"""
import errno
import json
import logging
import multiprocessing
import os
import pickle
import time

import pytest
from omegaconf import OmegaConf

import lavis_pformer.datasets.arrow_cache as arrow_cache
import lavis_pformer.datasets.compact as compact
from lavis_pformer.datasets.compact import CompactCaptions
from lavis_pformer.errors import ConfigError, DataError, SetupError


def _captions(folder, n=50, name="captions.json", word="caption"):
    records = [{"image": f"im/{i % 7}.jpg", "caption": f"{word} {i}", "image_id": i % 7} for i in range(n)]
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        json.dump(records, f)
    return path, records


def _count_parses(monkeypatch):
    calls = []
    parse = compact._build
    monkeypatch.setattr(compact, "_build", lambda paths, spool: calls.append(paths) or parse(paths, spool))
    return calls


def _captions_of(store):
    return [store.caption(i) for i in range(len(store))]


def test_a_later_start_maps_the_cache_file(tmp_path, monkeypatch):
    path, records = _captions(tmp_path)
    cache = str(tmp_path / "cache")
    parses = _count_parses(monkeypatch)
    first = CompactCaptions([path], cache_dir=cache)
    second = CompactCaptions([path], cache_dir=cache)
    assert len(parses) == 1 and second.table.path == first.table.path
    assert _captions_of(second) == [r["caption"] for r in records]
    assert second.image_index.tolist() == [i % 7 for i in range(50)] and second.num_images == 7
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(first.table.path), os.path.basename(first.table.path)
                                                + ".lock"])
    assert not second.caption_buffer.flags.writeable  # a view of the read-only mapping


def test_a_changed_source_is_parsed_again(tmp_path, monkeypatch):
    path, _ = _captions(tmp_path)
    cache = str(tmp_path / "cache")
    parses = _count_parses(monkeypatch)
    CompactCaptions([path], cache_dir=cache)
    stat = os.stat(path)
    _captions(tmp_path, word="legend ")  # other captions, other size
    assert _captions_of(CompactCaptions([path], cache_dir=cache))[:2] == ["legend  0", "legend  1"]
    _captions(tmp_path, word="texts  ")  # same size, later mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert _captions_of(CompactCaptions([path], cache_dir=cache))[:2] == ["texts   0", "texts   1"]
    assert len(parses) == 3 and len([f for f in os.listdir(cache) if f.endswith(".arrow")]) == 1
    assert len(CompactCaptions([path, path], cache_dir=cache)) == 100  # another list of sources: its own file
    assert len([f for f in os.listdir(cache) if f.endswith(".arrow")]) == 2


def _start_together(path, cache, out, barrier):
    """A process that starts with the others and writes what it read (and a line per parse it did) to ``out``."""
    parse = compact._build

    def slow_parse(paths, spool):
        with open(os.path.join(out, "parses"), "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the others arrive while this process holds the lock
        return parse(paths, spool)

    compact._build = slow_parse
    barrier.wait()
    store = CompactCaptions([path], cache_dir=cache)
    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
        json.dump({"captions": _captions_of(store), "index": store.image_index.tolist()}, f)


def test_processes_that_start_together_parse_once(tmp_path):
    path, records = _captions(tmp_path, n=300)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    os.makedirs(out)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_start_together, args=(path, cache, out, barrier)) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0] * 4
    assert len(open(os.path.join(out, "parses")).read().split()) == 1
    seen = [json.load(open(os.path.join(out, f"{p.pid}.json"))) for p in processes]
    assert all(s == seen[0] for s in seen) and seen[0]["captions"] == [r["caption"] for r in records]


def _die_while_writing(path, cache):
    def half_then_exit(target, columns, metadata):
        with open(target, "wb") as f:
            f.write(b"ARROW1" + b"\0" * 100)
        os._exit(3)

    arrow_cache._write = half_then_exit
    CompactCaptions([path], cache_dir=cache)


def test_a_builder_killed_halfway_leaves_nothing_a_reader_takes(tmp_path, caplog):
    path, records = _captions(tmp_path)
    cache = str(tmp_path / "cache")
    child = multiprocessing.get_context("fork").Process(target=_die_while_writing, args=(path, cache))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    left = sorted(os.listdir(cache))
    assert not [f for f in left if f.endswith(".arrow")] and [f for f in left if f.endswith(".tmp")]
    with caplog.at_level(logging.INFO):
        store = CompactCaptions([path], cache_dir=cache)  # the lock died with the child
    assert _captions_of(store) == [r["caption"] for r in records]
    assert "left by a build that did not finish" in caplog.text
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(store.table.path), os.path.basename(store.table.path)
                                                + ".lock"])


def test_a_failed_build_leaves_no_file_and_an_unreadable_one_is_rebuilt(tmp_path, caplog):
    cache = str(tmp_path / "cache")
    path = tmp_path / "bad.json"
    path.write_text('[{"image": "a", "caption": "b"}]')
    with pytest.raises(DataError, match=r"entry 0: missing \['image_id'\]"):
        CompactCaptions([str(path)], cache_dir=cache)
    assert [f for f in os.listdir(cache) if not f.endswith(".lock")] == []
    good, records = _captions(tmp_path)
    cached = CompactCaptions([good], cache_dir=cache).table.path
    with open(cached, "r+b") as f:
        f.truncate(os.path.getsize(cached) // 2)
    with caplog.at_level(logging.WARNING):
        store = CompactCaptions([good], cache_dir=cache)
    assert f"annotation cache {cached} cannot be read" in caplog.text and "rebuilding it" in caplog.text
    assert _captions_of(store) == [r["caption"] for r in records]


def test_no_cache_file_and_an_unusable_folder(tmp_path, caplog, annotation_cache):
    path, records = _captions(tmp_path)
    before = set(os.listdir(annotation_cache))
    private = CompactCaptions([path], cache_dir=False)
    assert private.table.path is None and set(os.listdir(annotation_cache)) == before
    assert _captions_of(pickle.loads(pickle.dumps(private))) == [r["caption"] for r in records]  # the data travel
    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING):
        store = CompactCaptions([path], cache_dir=str(tmp_path / "a_file" / "cache"))
    assert "cannot use the annotation cache folder" in caplog.text and "set build_info.cache_dir" in caplog.text
    assert store.table.path is None and _captions_of(store) == [r["caption"] for r in records]


def test_full_disk_and_bad_setting_are_clear_errors(tmp_path, monkeypatch):
    path, _ = _captions(tmp_path)
    cache = str(tmp_path / "cache")

    def disk_full(target, columns, metadata):
        open(target, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arrow_cache, "_write", disk_full)
    with pytest.raises(SetupError, match=r"cannot write the annotation cache .*captions-\w+\.arrow \(No space left on "
                                         r"device\)\. Free space there, or set build_info.cache_dir"):
        CompactCaptions([path], cache_dir=cache)
    assert [f for f in os.listdir(cache) if not f.endswith(".lock")] == []
    with pytest.raises(ConfigError, match=r"datasets.local_caption.build_info.cache_dir must be a folder, auto or "
                                          r"false, got 3"):
        CompactCaptions([path], cache_dir=3, cache_key="datasets.local_caption.build_info.cache_dir")


def test_pickled_as_the_path_and_stale_after_a_rebuild(tmp_path):
    path, records = _captions(tmp_path, n=2000)
    cache = str(tmp_path / "cache")
    store = CompactCaptions([path], cache_dir=cache)
    data = pickle.dumps(store)
    assert len(data) < 2000 and b"caption 1999" not in data  # what a spawned worker receives: the file's path
    assert _captions_of(pickle.loads(data)) == [r["caption"] for r in records]
    _captions(tmp_path, n=2001)
    CompactCaptions([path], cache_dir=cache)  # another start rebuilds the file under the running job
    assert _captions_of(store)[-1] == "caption 1999"  # the job's mapping still reads the file it opened
    with pytest.raises(SetupError, match="was rebuilt while this run used the older one .*restart the run"):
        pickle.loads(data)


def test_builder_maps_the_cache_and_logs_blank_captions_at_every_start(tiny, tmp_path, caplog):
    from lavis.common.registry import registry

    world = tiny["world"]
    records = json.load(open(os.path.join(world, "captions_train.json")))
    records[3]["caption"] = "  "
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records))
    cfg = OmegaConf.create({"build_info": {"images": {"storage": world}, "cache_dir": str(tmp_path / "cache"),
                                           "annotations": {"train": {"storage": str(path)}}}})
    for start in ("parsed", "mapped"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train = registry.get_builder_class("local_caption")(cfg).build_datasets()["train"]
        assert f"{path}: 1 of {len(records)} captions are empty or blank" in caplog.text, start
        assert ("parsed in" in caplog.text) == (start == "parsed")
        assert train[5]["text_input"] == train.text_processor(records[5]["caption"])
