"""Tests of the synthetic shapes world (lavis_pformer.synthetic.shapes_world)."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lavis_pformer.synthetic import shapes_world as sw

SMALL = dict(n_train=20, n_val=8, n_test=8, n_corpus=200, n_vision=12)
OBJ = re.compile(r"(?:a|an) (\w+) (\w+) at the (top left|top right|bottom left|bottom right)")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two seed-0 worlds and one seed-1 world: {name: paths}."""
    return {
        name: sw.generate(str(tmp_path_factory.mktemp(name)), seed=seed, **SMALL)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }


def _load(paths, name):
    with open(paths[name], encoding="utf-8") as f:
        return json.load(f)


def _lines(paths, name):
    with open(paths[name], encoding="utf-8") as f:
        return f.read().splitlines()


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_same_seed_identical_other_seed_different(worlds):
    a, b, c = (_files(worlds[k]["root"]) for k in "abc")
    assert a == b
    assert set(a) == set(c)
    assert a["captions_train.json"] != c["captions_train.json"]
    assert a["corpus.txt"] != c["corpus.txt"]
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 48 and sum(a[k] != c[k] for k in pngs) > 40


def test_layout_and_paths(worlds):
    paths = worlds["a"]
    for name in ["captions_train", "captions_val", "captions_test", "coco_gt_val", "coco_gt_test",
                 "vqa_val", "vqa_val_questions", "vqa_val_annotations", "vqa_test",
                 "vqa_test_questions", "vqa_test_annotations", "vqa_answer_list", "corpus",
                 "qa_triples", "sentences", "world"]:
        assert os.path.isfile(paths[name]), name
    for split, n in (("train", 20), ("val", 8), ("test", 8)):
        recs = _load(paths, f"captions_{split}")
        assert len(recs) == n
        assert all(r["image"].startswith(f"images/{split}/") for r in recs)
        assert all(isinstance(r["image_id"], str) and int(r["image_id"]) > 0 for r in recs)
        assert len(os.listdir(os.path.join(paths["root"], "images", split))) == n
    ids = [r["image_id"] for s in ("train", "val", "test") for r in _load(paths, f"captions_{s}")]
    assert len(set(ids)) == len(ids)


def test_images_match_captions(worlds):
    """32x32 RGB; each captioned quadrant holds exactly that colour, with the captioned shape."""
    paths = worlds["a"]
    fill = {"square": (0.95, 1.0), "circle": (0.7, 0.85), "triangle": (0.45, 0.62)}
    recs = _load(paths, "captions_train")[:8] + _load(paths, "captions_val")
    for rec in recs:
        img = Image.open(os.path.join(paths["root"], rec["image"]))
        assert img.size == (32, 32) and img.mode == "RGB"
        arr = np.asarray(img)
        objects = {pos: (c, s) for c, s, pos in OBJ.findall(rec["caption"])}
        assert 1 <= len(objects) <= 3, rec
        for q, pos in enumerate(sw.POSITIONS):
            cell = arr[16 * (q // 2): 16 * (q // 2) + 16, 16 * (q % 2): 16 * (q % 2) + 16]
            mask = (cell != 0).any(-1)
            if pos not in objects:
                assert not mask.any(), (rec, pos)
                continue
            colour, shape = objects[pos]
            assert (cell[mask] == sw.COLOURS[colour]).all(), (rec, pos)
            ys, xs = np.nonzero(mask)
            ratio = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            lo, hi = fill[shape]
            assert lo <= ratio <= hi, (rec, pos, ratio)


def test_no_eval_scene_in_training_text(worlds):
    paths = worlds["a"]
    evals = {r["caption"] for s in ("val", "test") for r in _load(paths, f"captions_{s}")}
    train = {r["caption"] for r in _load(paths, "captions_train")}
    corpus = {line.split(" Question: ")[0] for line in _lines(paths, "corpus")}
    sentences = set(_lines(paths, "sentences"))
    triples = {json.loads(line)["caption"] for line in _lines(paths, "qa_triples")}
    for texts in (train, corpus, sentences, triples):
        assert texts and not evals & texts
    val = {r["caption"] for r in _load(paths, "captions_val")}
    test = {r["caption"] for r in _load(paths, "captions_test")}
    assert not val & test


def test_vision_pretraining_images(worlds):
    """Unpaired images of training scenes with their contents; val contents agree with the val captions."""
    paths = worlds["a"]
    vision, val = _load(paths, "vision_pretrain"), _load(paths, "vision_val")
    assert len(vision) == 12 and len(os.listdir(os.path.join(paths["root"], "images", "vision"))) == 12
    evals = {r["caption"] for s in ("val", "test") for r in _load(paths, f"captions_{s}")}
    for rec in vision:
        img = np.asarray(Image.open(os.path.join(paths["root"], rec["image"])))
        key = tuple(tuple(o) for o in rec["objects"])
        assert sw.caption(key) not in evals  # a training-pool scene
        for quadrant, colour, _ in key:
            cell = img[16 * (quadrant // 2): 16 * (quadrant // 2) + 16, 16 * (quadrant % 2): 16 * (quadrant % 2) + 16]
            assert (cell[(cell != 0).any(-1)] == sw.COLOURS[colour]).all()
    captions = _load(paths, "captions_val")
    assert [r["image"] for r in val] == [r["image"] for r in captions]
    assert [sw.caption(tuple(tuple(o) for o in r["objects"])) for r in val] == [r["caption"] for r in captions]


def test_scene_key_split_is_disjoint_and_complete():
    pools = sw._split_keys(0)
    sets = {name: {k for keys in by_n.values() for k in keys} for name, by_n in pools.items()}
    assert not sets["val"] & sets["test"] and not sets["val"] & sets["other"]
    assert not sets["test"] & sets["other"]
    assert sum(map(len, sets.values())) == sum(len(v) for v in sw.all_scene_keys().values()) == 21492


def test_corpus_qa_triples_sentences(worlds, tmp_path):
    paths = worlds["a"]
    corpus, sentences = _lines(paths, "corpus"), _lines(paths, "sentences")
    assert len(corpus) == len(sentences) == 200
    with_qa = [line for line in corpus if "Question: " in line]
    assert 0.8 <= len(with_qa) / len(corpus) <= 0.97
    pair = re.compile(r"Question: ([a-z ]+\?) Short answer: (\w+)$")  # one pair per line; the answer ends it
    triples = [json.loads(line) for line in _lines(paths, "qa_triples")]
    assert all(len(pair.findall(line)) == 1 for line in with_qa) and len(triples) == len(with_qa)
    for t in triples:
        assert set(t) == {"caption", "question", "answer", "question_type"}
        assert t["answer"] in sw.ANSWERS[t["question_type"]]
        assert _answer(t["caption"], t["question"], t["question_type"]) == t["answer"]
    # a line is "<caption>[ <QA pair>]", or that text after a context segment "<caption></s>", or a context
    # segment followed by the QA pair alone; the QA pair is always about the line's caption
    contexts = 0
    for line, sentence in zip(corpus, sentences):
        segments = line.split(sw.SEGMENT_SEP)
        assert len(segments) in (1, 2) and segments[0].startswith(sentence)
        if len(segments) == 2:
            contexts += 1
            assert segments[0] == sentence
            assert segments[1].startswith(sentence) or segments[1].startswith("Question: ")
    assert 0.35 <= contexts / len(corpus) <= 0.65  # context_fraction 0.5
    plain = sw.generate(str(tmp_path), seed=0, context_fraction=0.0, **SMALL)
    assert _lines(plain, "sentences") == sentences and _lines(plain, "qa_triples") == _lines(paths, "qa_triples")
    for line, line_without_context in zip(corpus, _lines(plain, "corpus")):  # the context changes nothing else
        last = line.split(sw.SEGMENT_SEP)[-1]
        assert last == line_without_context or (last.startswith("Question: ")
                                                and line_without_context.endswith(" " + last))


def _answer(cap, question, qtype):
    """Answer a question from the caption alone (independent re-implementation)."""
    objs = [(c, s) for c, s, _ in OBJ.findall(cap)]
    words = question.rstrip("?").split()
    if qtype == "color":
        return next(c for c, s in objs if s == words[-1])
    if qtype == "shape":
        return next(s for c, s in objs if c == words[-2])
    if qtype == "count":
        return str(len(objs))
    return "yes" if (words[-2], words[-1]) in objs else "no"


def test_vqa_files(worlds):
    paths = worlds["a"]
    for split in ("val", "test"):
        caps = {int(r["image_id"]): r["caption"] for r in _load(paths, f"captions_{split}")}
        qfile = _load(paths, f"vqa_{split}_questions")
        afile = _load(paths, f"vqa_{split}_annotations")
        lst = _load(paths, f"vqa_{split}")
        for key in ("info", "task_type", "data_type", "data_subtype", "license"):
            assert key in qfile
        qids = [q["question_id"] for q in qfile["questions"]]
        assert len(set(qids)) == len(qids) == len(lst) == len(afile["annotations"]) >= 2 * len(caps)
        answers = {a["question_id"]: a for a in afile["annotations"]}
        assert set(answers) == set(qids) == {r["question_id"] for r in lst}
        for rec in lst:
            ann = answers[rec["question_id"]]
            assert len(ann["answers"]) == 10 and ann["answers"][0]["answer"] == rec["answer"][0]
            assert ann["multiple_choice_answer"] == rec["answer"][0]
            assert ann["question_type"] == ann["answer_type"] == rec["question_type"]
            assert rec["question_type"] in sw.QUESTION_TYPES
            assert rec["answer"][0] in sw.ANSWERS[rec["question_type"]]
            assert rec["image"] == f"images/{split}/{rec['image_id']:06d}.png"
            assert _answer(caps[rec["image_id"]], rec["question"], rec["question_type"]) == rec["answer"][0]
        assert {r["question_type"] for r in lst} >= {"count", "yesno"}


def test_world_json_and_chance(worlds):
    paths = worlds["a"]
    world = _load(paths, "world")
    assert world["seed"] == 0 and world["splits"] == {"train": 20, "val": 8, "test": 8}
    assert world["colours"].keys() == sw.COLOURS.keys() and world["shapes"] == list(sw.SHAPES)
    assert world["positions"] == list(sw.POSITIONS) and world["answers"] == sw.ANSWERS
    assert world["counts"]["corpus_lines"] == 200
    for split, key in (("test", "chance"), ("val", "chance_val")):
        lst = _load(paths, f"vqa_{split}")
        hits = 0
        for qtype, entry in world[key]["per_type"].items():
            counts = Counter(r["answer"][0] for r in lst if r["question_type"] == qtype)
            assert counts[entry["majority_answer"]] == max(counts.values())
            assert entry["accuracy"] == pytest.approx(max(counts.values()) / sum(counts.values()))
            hits += max(counts.values())
        assert world[key]["overall"] == pytest.approx(hits / len(lst))
        assert world[key]["questions"] == len(lst)
    assert set(world["vocabulary"]) >= {"circle", "orange", "left", "Question", "yes", "3"}


def test_coco_gt_loads_with_pycocotools(worlds):
    from pycocotools.coco import COCO

    paths = worlds["a"]
    coco = COCO(paths["coco_gt_val"])
    recs = _load(paths, "captions_val")
    assert sorted(coco.getImgIds()) == sorted(int(r["image_id"]) for r in recs)
    res_file = os.path.join(paths["root"], "res.json")
    with open(res_file, "w") as f:
        json.dump([{"image_id": int(r["image_id"]), "caption": r["caption"]} for r in recs], f)
    res = coco.loadRes(res_file)
    assert len(res.getAnnIds()) == len(recs)
    os.remove(res_file)


def test_cli_and_argument_checks(tmp_path, capsys):
    sw.main(["--out", str(tmp_path / "w"), "--seed", "3", "--n-train", "2", "--n-val", "2",
             "--n-test", "2", "--n-corpus", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["splits"] == {"train": 2, "val": 2, "test": 2} and out["corpus_lines"] == 5
    assert json.load(open(tmp_path / "w" / "world.json"))["seed"] == 3
    # a smaller rerun into the same folder removes the stale images
    sw.generate(str(tmp_path / "w"), seed=3, n_train=1, n_val=1, n_test=1, n_corpus=0)
    assert len(os.listdir(tmp_path / "w" / "images" / "train")) == 1
    with pytest.raises(ValueError, match="n_train"):
        sw.generate(str(tmp_path / "x"), n_train=0)
    with pytest.raises(ValueError, match="qa_fraction"):
        sw.generate(str(tmp_path / "x"), qa_fraction=1.5)


def _pairs(caption):
    return {(c, s) for c, s, _ in OBJ.findall(caption)}


def test_held_out_pairs_stay_out_of_every_paired_split_and_in_the_unpaired_data(worlds, tmp_path):
    held_paths = sw.generate(str(tmp_path / "held"), seed=0, held_out_pairs=3, **SMALL)
    world = _load(held_paths, "world")
    held = {tuple(p) for p in world["held_out_pairs"]}
    assert held == set(sw.choose_held_out_pairs(0, 3)) and len(held) == 3
    assert len({c for c, _ in held}) == 3 and {s for _, s in held} == set(sw.SHAPES)  # one per colour and shape
    for split in ("train", "val", "test"):
        captions = [r["caption"] for r in _load(held_paths, f"captions_{split}")]
        assert captions and not any(_pairs(c) & held for c in captions), split
    ood = [r["caption"] for r in _load(held_paths, "captions_test_ood")]
    assert len(ood) == SMALL["n_test"] and all(_pairs(c) & held for c in ood)
    assert world["splits"]["test_ood"] == SMALL["n_test"] and "overall" in world["chance_test_ood"]
    assert world["counts"]["questions"]["test_ood"]["count"] == SMALL["n_test"]
    # the unpaired text and images are the same as without held-out pairs, and they hold the held-out pairs
    plain = worlds["a"]
    for name in ("corpus", "sentences", "qa_triples", "vision_pretrain"):
        assert open(held_paths[name], "rb").read() == open(plain[name], "rb").read(), name
    corpus_pairs = set().union(*(_pairs(line) for line in _lines(held_paths, "sentences")))
    assert corpus_pairs & held
    # the out-of-domain images are ids after the unpaired images and VQAv2 files exist for them
    first_ood = int(_load(held_paths, "captions_test_ood")[0]["image_id"])
    assert first_ood == 1 + sum(SMALL[f"n_{s}"] for s in ("train", "val", "test")) + SMALL["n_vision"]
    for name in ("vqa_test_ood", "vqa_test_ood_questions", "vqa_test_ood_annotations", "coco_gt_test_ood"):
        assert os.path.isfile(held_paths[name]), name
    with pytest.raises(ValueError, match="held_out_pairs"):
        sw.generate(str(tmp_path / "bad"), seed=0, held_out_pairs=4, **SMALL)


def test_without_held_out_pairs_the_world_has_no_out_of_domain_split(worlds):
    world = _load(worlds["a"], "world")
    assert "held_out_pairs" not in world and "test_ood" not in world["splits"]
    assert not os.path.exists(os.path.join(worlds["a"]["root"], "captions_test_ood.json"))
