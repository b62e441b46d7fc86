"""docs/data.md: every builder builds from the page's own examples (files and run config), and what the page
says about them holds (three records each; the VQA and COCO files pass LAVIS's scorer and pycocotools)."""
import json
import os
import re

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import lavis_pformer  # noqa: F401
from lavis.common.config import Config
from lavis.common.registry import registry

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "data.md")
BUILDERS = ("sentence_corpus", "local_caption", "image_text_shards", "local_vqa", "video_features_caption")


def examples():
    """{builder: {relative path: text}} from the ``<!-- example: builder/path -->`` blocks of docs/data.md."""
    found = {}
    for builder, path, text in re.findall(r"<!-- example: (\w+)/(\S+) -->\n```\w*\n(.*?)```", open(DOC).read(), re.S):
        found.setdefault(builder, {})[path] = text
    return found


def write_example(builder, root):
    """The builder's example files under ``root``; returns its run config's ``datasets`` section."""
    files = examples()[builder]
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)) or root, exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    data_files = {p: t for p, t in files.items() if p != "run.yaml"}
    for path, text in data_files.items():
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 3, (builder, path, len(lines))  # "a three-record example" in three lines
    return OmegaConf.create(files["run.yaml"]).datasets


def build(builder, root, monkeypatch):
    monkeypatch.chdir(root)
    datasets = write_example(builder, root)
    cfg = Config.build_dataset_config(OmegaConf.create({"datasets": datasets}))["datasets"][builder]
    return registry.get_builder_class(builder)(cfg).build_datasets()


def make_images(root, records, folder="data"):
    for rec in records:
        path = os.path.join(root, folder, rec["image"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(path, format="JPEG")


def test_every_builder_has_examples():
    assert set(examples()) == set(BUILDERS)


def test_image_text_shards_example(tmp_path, monkeypatch, capsys):
    """The page's converter command on its captions file writes the shards its run config reads; the shard listing
    and the printed lines are the page's."""
    import webdataset as wds

    from lavis_pformer.datasets import to_shards

    root, doc = str(tmp_path), open(DOC).read()
    write_example("image_text_shards", root)
    make_images(root, json.load(open(os.path.join(root, "data/captions_train.json"))))
    monkeypatch.chdir(root)
    command, printed = re.search(r"python -m lavis_pformer.datasets.to_shards (.*)\n((?:# .*\n)+)", doc).groups()
    assert to_shards.main(command.split()) == 0
    assert capsys.readouterr().out == printed.replace("# ", "").replace("<cwd>", root)
    first = next(iter(wds.tarfile_samples([{"url": "shards/00000.tar"}])))
    listing = re.search(r"```text\n(000000000.jpg.*?)```", doc, re.S).group(1)
    assert f"000000000.json   {first['json'].decode()}" in listing and f"000000000.txt    {first['txt'].decode()}" in listing
    ds = build("image_text_shards", root, monkeypatch)["train"]
    items = [item for item, _ in zip(ds, range(12))]
    assert {i["instance_id"] for i in items} == {"00000.tar/000000000", "00001.tar/000000001", "00002.tar/000000002"}
    assert items[0]["image"].shape == (3, 224, 224)


def test_sentence_corpus_example(tmp_path, monkeypatch):
    ds = build("sentence_corpus", str(tmp_path), monkeypatch)["train"]
    assert len(ds) == 9 and ds[0]["text_input"].startswith("a man rides a bicycle")  # blip_caption-processed
    assert ds[3]["question"] == "what color is the bus?" and ds[3]["answer"] == "red"
    assert ds[7]["text_input"] == "an old clock tower in the town square"  # the "text" key


def test_local_caption_example(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_example("local_caption", root)
    for split in ("train", "test"):
        make_images(root, json.load(open(os.path.join(root, f"data/captions_{split}.json"))))
    out = build("local_caption", root, monkeypatch)
    assert len(out["train"]) == 3 and out["train"][0]["image"].shape == (3, 224, 224)
    assert out["test"][2]["image_id"] == 6 and out["test"].coco_gt_file == os.path.join(root, "data/coco_gt_test.json")
    from pycocotools.coco import COCO

    gt = COCO(out["test"].coco_gt_file)
    predictions = [{"image_id": i, "caption": "a caption"} for i in (4, 5, 6)]
    assert sorted(gt.loadRes(predictions).getImgIds()) == [4, 5, 6] == sorted(gt.getImgIds())


def test_local_vqa_example_scores_100_with_the_right_answers(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_example("local_vqa", root)
    make_images(root, json.load(open(os.path.join(root, "data/vqa_test.json"))))
    ds = build("local_vqa", root, monkeypatch)["test"]
    assert len(ds) == 3 and ds[2]["text_input"] == "how many children are there?" and ds[2]["question_type"] == "count"
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    result = tmp_path / "result.json"
    result.write_text(json.dumps([{"question_id": 41, "answer": "cooking"}, {"question_id": 51, "answer": "yes"},
                                  {"question_id": 61, "answer": "4"}]))
    vqa = VQA(ds.coco_fmt_anno_file, ds.coco_fmt_qust_file)
    scorer = VQAEval(vqa, vqa.loadRes(resFile=str(result), quesFile=ds.coco_fmt_qust_file), n=2)
    scorer.evaluate()
    assert scorer.accuracy["overall"] == 100.0


def test_video_features_example(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_example("video_features_caption", root)
    os.makedirs(os.path.join(root, "video/features"))
    for i, clips in enumerate((12, 40, 3, 5, 1, 7), start=1):
        np.save(os.path.join(root, f"video/features/v_{i:03d}.npy"), np.random.rand(clips, 1024).astype("float32"))
    out = build("video_features_caption", root, monkeypatch)
    assert len(out["train"]) == 6 and len(out["test"]) == 3  # one item per caption / per video
    assert out["train"][2]["clip_features"].shape == (32, 1024)  # 40 clips subsampled to max_clips
    assert out["test"].coco_gt_file.startswith(os.path.join(root, "video/coco_gt"))


@pytest.mark.parametrize("key", ["max_bad_images", "check_images", "max_bad_lines"])
def test_tolerance_keys_are_documented(key):
    assert f"`{key}`" in open(DOC).read()
