"""Tests of the local image-text builders `local_caption` and `local_vqa`."""

import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.tasks.vqa import VQATask
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_pformer.datasets.local_image_text import (
    ImageReadError,
    LocalCaptionDataset,
    LocalCaptionEvalDataset,
    LocalVQAEvalDataset,
)
from lavis_pformer.synthetic.shapes_world import generate


@pytest.fixture(scope="module")
def world_src(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("world")), seed=0,
                    n_train=20, n_val=8, n_test=8, n_corpus=200, n_vision=0)["root"]


@pytest.fixture
def world(world_src, tmp_path):
    """A private copy of the small world, safe to damage."""
    return shutil.copytree(world_src, str(tmp_path / "w"))


def _cap_cfg(d, splits=("train", "val", "test"), gt=True):
    ann = {"train": {"storage": f"{d}/captions_train.json"}}
    for s in ("val", "test"):
        ann[s] = {"storage": f"{d}/captions_{s}.json"}
        if gt:
            ann[s]["gt"] = f"{d}/coco_gt_{s}.json"
    return {"build_info": {"images": {"storage": d}, "annotations": {s: ann[s] for s in splits}}}


def _vqa_cfg(d, splits=("val", "test"), answer_list=True):
    ann = {
        s: {"storage": f"{d}/vqa_{s}.json", "question_file": f"{d}/vqa_{s}_questions.json",
            "annotation_file": f"{d}/vqa_{s}_annotations.json"}
        for s in splits
    }
    if answer_list:
        for s in splits:
            ann[s]["answer_list"] = f"{d}/vqa_answer_list.json"
    return {"build_info": {"images": {"storage": d}, "annotations": ann}}


def _build(name, cfg):
    return registry.get_builder_class(name)(OmegaConf.create(cfg)).build_datasets()


def _json(path):
    with open(path) as f:
        return json.load(f)


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_caption_builder_splits_items_and_batches(world_src):
    ds = _build("local_caption", _cap_cfg(world_src))
    assert {k: len(v) for k, v in ds.items()} == {"train": 20, "val": 8, "test": 8}
    assert isinstance(ds["train"], LocalCaptionDataset) and isinstance(ds["val"], LocalCaptionEvalDataset)
    item = ds["train"][3]
    assert set(item) == {"image", "text_input", "image_id"} and item["image_id"] == 3
    assert "." not in item["text_input"] and item["text_input"].startswith("a")
    batch = next(iter(DataLoader(ds["train"], batch_size=4, collate_fn=ds["train"].collater)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert len(batch["text_input"]) == 4
    for split in ("val", "test"):
        ev = ds[split]
        assert ev.coco_gt_file == os.path.join(world_src, f"coco_gt_{split}.json")
        batch = next(iter(DataLoader(ev, batch_size=3, collate_fn=ev.collater)))
        assert set(batch) == {"image", "image_id", "instance_id"}
        assert batch["image"].shape == (3, 3, 32, 32)
        gt_ids = {img["id"] for img in _json(ev.coco_gt_file)["images"]}
        assert {int(i) for i in batch["image_id"]} <= gt_ids  # what LAVIS's valid_step does


def test_caption_builder_through_lavis_config_and_relative_paths(world_src, monkeypatch):
    monkeypatch.chdir(world_src)
    user = {"datasets": {"local_caption": {"build_info": {
        "images": {"storage": "."},
        "annotations": {"train": {"storage": "captions_train.json"},
                        "val": {"storage": ["captions_val.json", "captions_test.json"]}},
    }}}}
    cfg = Config.build_dataset_config(OmegaConf.create(user))["datasets"]["local_caption"]
    assert cfg.vis_processor.eval.image_size == 32  # the default yaml was merged in
    ds = registry.get_builder_class("local_caption")(cfg).build_datasets()
    assert len(ds["train"]) == 20 and len(ds["val"]) == 16 and ds["val"].coco_gt_file is None
    assert ds["val"][15]["image"].shape == (3, 32, 32)


def test_caption_greyscale_and_rgba_images_work(world):
    recs = _json(f"{world}/captions_train.json")
    for rec, mode in zip(recs[:3], ("L", "RGBA", "P")):
        path = os.path.join(world, rec["image"])
        Image.open(path).convert(mode).save(path)
    ds = _build("local_caption", _cap_cfg(world, ("train",)))["train"]
    for i in range(3):
        assert ds[i]["image"].shape == (3, 32, 32)


def test_caption_corrupt_and_missing_images_name_the_file(world):
    recs = _json(f"{world}/captions_train.json")
    bad, gone = (os.path.join(world, recs[i]["image"]) for i in (1, 2))
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not an image")
    os.remove(gone)
    cfg = _cap_cfg(world, ("train",))
    cfg["build_info"]["check_images"] = False  # not checked at build: the errors come when the images are read
    ds = _build("local_caption", cfg)["train"]
    with pytest.raises(ImageReadError, match=re.escape(bad)):
        ds[1]
    with pytest.raises(FileNotFoundError, match=re.escape(gone)):
        ds[2]
    loader = DataLoader(ds, batch_size=3, collate_fn=ds.collater)
    with pytest.raises(ImageReadError, match=re.escape(bad)):
        next(iter(loader))


def test_caption_config_errors(world):
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere.*images.storage"):
        cfg = _cap_cfg(world)
        cfg["build_info"]["images"]["storage"] = f"{world}/nowhere"
        _build("local_caption", cfg)
    os.remove(f"{world}/captions_val.json")
    with pytest.raises(FileNotFoundError, match=r"captions_val\.json does not exist.*annotations\.val\.storage"):
        _build("local_caption", _cap_cfg(world))
    with pytest.raises(FileNotFoundError, match="coco_gt_test.json"):
        os.remove(f"{world}/coco_gt_test.json")
        _build("local_caption", _cap_cfg(world, ("test",)))
    with open(f"{world}/captions_train.json", "w") as f:
        f.write("[{")
    with pytest.raises(ValueError, match="captions_train.json is not valid JSON"):
        _build("local_caption", _cap_cfg(world, ("train",)))
    _dump(f"{world}/captions_train.json", [{"image": "images/train/000001.png", "image_id": "1"}])
    with pytest.raises(ValueError, match=r"entry 0: missing \['caption'\]"):
        _build("local_caption", _cap_cfg(world, ("train",)))
    _dump(f"{world}/captions_train.json", [{"image": "train/000001.png", "caption": "x", "image_id": 1}])
    with pytest.raises(FileNotFoundError, match="first entry of"):
        _build("local_caption", _cap_cfg(world, ("train",)))
    recs = _json(f"{world}/captions_test.json")
    recs[0]["image_id"] = "img_one"
    _dump(f"{world}/captions_test.json", recs)
    with pytest.raises(ValueError, match="image_id 'img_one' is not an integer"):
        _build("local_caption", _cap_cfg(world, ("test",), gt=False))
    with pytest.raises(ValueError, match="at least one"):
        _build("local_caption", {"build_info": {"images": {"storage": world}}})
    with pytest.raises(ValueError, match="images.storage"):
        _build("local_caption", {"build_info": {"annotations": {"train": {"storage": "x.json"}}}})


def test_vqa_builder_items_and_batches(world_src):
    ds = _build("local_vqa", _vqa_cfg(world_src))
    for split in ("val", "test"):
        v = ds[split]
        recs = _json(f"{world_src}/vqa_{split}.json")
        assert isinstance(v, LocalVQAEvalDataset) and len(v) == len(recs)
        assert v.coco_fmt_qust_file == os.path.join(world_src, f"vqa_{split}_questions.json")
        assert v.coco_fmt_anno_file == os.path.join(world_src, f"vqa_{split}_annotations.json")
        assert "yes" in v.answer_list and "3" in v.answer_list
        batch = next(iter(DataLoader(v, batch_size=4, collate_fn=v.collater)))
        assert batch["image"].shape == (4, 3, 32, 32)
        assert batch["question_id"].tolist() == [r["question_id"] for r in recs[:4]]
        assert batch["text_input"][0] == recs[0]["question"].lower()
        assert batch["question_type"] == [r["question_type"] for r in recs[:4]]
        assert batch["instance_id"] == ["0", "1", "2", "3"]
    no_list = _build("local_vqa", _vqa_cfg(world_src, ("val",), answer_list=False))
    assert no_list["val"].answer_list is None


def test_vqa_task_picks_up_the_offline_files(world_src):
    task = VQATask(num_beams=1, max_len=5, min_len=1, evaluate=True, num_ans_candidates=4)
    cfg = SimpleNamespace(datasets_cfg=OmegaConf.create({"local_vqa": _vqa_cfg(world_src)}))
    task.build_datasets(cfg)
    assert task.ques_files == {s: f"{world_src}/vqa_{s}_questions.json" for s in ("val", "test")}
    assert task.anno_files == {s: f"{world_src}/vqa_{s}_annotations.json" for s in ("val", "test")}
    assert task.answer_list is not None


def _score(world, split, answer_for):
    recs = _json(f"{world}/vqa_{split}.json")
    res = f"{world}/res_{split}.json"
    _dump(res, [{"question_id": r["question_id"], "answer": answer_for(i, r)} for i, r in enumerate(recs)])
    qfile, afile = f"{world}/vqa_{split}_questions.json", f"{world}/vqa_{split}_annotations.json"
    vqa = VQA(afile, qfile)
    scorer = VQAEval(vqa, vqa.loadRes(resFile=res, quesFile=qfile), n=2)
    scorer.evaluate()
    return scorer.accuracy, len(recs)


def test_lavis_vqa_scorer_on_generated_files(world):
    acc, n = _score(world, "val", lambda i, r: r["answer"][0])
    assert acc["overall"] == 100.0
    assert set(acc["perAnswerType"]) == {r["question_type"] for r in _json(f"{world}/vqa_val.json")}
    # every other answer wrong; predictions get VQA normalisation ("Two." -> "2", "the red" -> "red")
    spelled = {"1": "one", "2": "Two.", "3": "three"}
    acc, n = _score(world, "val", lambda i, r: ("wrong" if i % 2 else
                                                spelled.get(r["answer"][0], "the " + r["answer"][0])))
    assert acc["overall"] == round(100 * ((n + 1) // 2) / n, 2)
    acc, _ = _score(world, "test", lambda i, r: "no")
    recs = _json(f"{world}/vqa_test.json")
    assert acc["overall"] == round(100 * sum(r["answer"][0] == "no" for r in recs) / len(recs), 2)


def test_vqa_errors(world):
    with pytest.raises(ValueError, match="unknown split"):
        _build("local_vqa", {"build_info": {"images": {"storage": world},
                                            "annotations": {"train": {"storage": "x"}}}})
    with pytest.raises(ValueError, match="annotation_file"):
        cfg = _vqa_cfg(world, ("val",))
        del cfg["build_info"]["annotations"]["val"]["annotation_file"]
        _build("local_vqa", cfg)
    with pytest.raises(FileNotFoundError, match="image folder"):
        cfg = _vqa_cfg(world, ("val",))
        cfg["build_info"]["images"]["storage"] = f"{world}/missing"
        _build("local_vqa", cfg)
    afile = f"{world}/vqa_val_annotations.json"
    anns = _json(afile)
    full = json.loads(json.dumps(anns))
    qid = anns["annotations"][0]["question_id"]
    anns["annotations"] = anns["annotations"][1:]
    _dump(afile, anns)
    with pytest.raises(ValueError, match=rf"vqa_val_questions.json: 1 question\(s\) have no answers .*{qid}"):
        _build("local_vqa", _vqa_cfg(world, ("val",)))
    full["annotations"][2]["answers"] = []
    _dump(afile, full)
    with pytest.raises(ValueError, match=r"annotation 2 .*non-empty list"):
        _build("local_vqa", _vqa_cfg(world, ("val",)))
    os.remove(afile)
    with pytest.raises(FileNotFoundError, match="vqa_val_annotations.json does not exist"):
        _build("local_vqa", _vqa_cfg(world, ("val",)))
    lst = _json(f"{world}/vqa_test.json")
    _dump(f"{world}/vqa_test.json", lst[1:])
    with pytest.raises(ValueError, match="list different question ids"):
        _build("local_vqa", _vqa_cfg(world, ("test",)))
    qfile = _json(f"{world}/vqa_test_questions.json")
    del qfile["license"]
    _dump(f"{world}/vqa_test_questions.json", qfile)
    with pytest.raises(ValueError, match=r"lacks \['license'\]"):
        _build("local_vqa", _vqa_cfg(world, ("test",)))


def test_vqa_image_errors_and_modes(world):
    recs = _json(f"{world}/vqa_val.json")
    grey = os.path.join(world, recs[0]["image"])
    Image.open(grey).convert("LA").save(grey)
    v = _build("local_vqa", _vqa_cfg(world, ("val",)))["val"]
    assert v[0]["image"].shape == (3, 32, 32)
    with open(grey, "wb") as f:
        f.write(b"")
    with pytest.raises(ImageReadError, match=re.escape(grey)):
        v[0]
