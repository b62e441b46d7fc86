"""A synthetic "shapes world" for the miniature P-Former demo, generated from a seed (nothing downloaded).

Command line::

    python -m lavis_pformer.synthetic.shapes_world --out DIR [--seed 0] [--n-train 1000] [--n-val 200]
        [--n-test 200] [--n-corpus 40000] [--qa-fraction 0.9] [--n-vision 4000]

Python: ``generate(out_dir, seed=0, ...)`` returns a dict of the absolute paths written.

The world
---------
- Images are 32x32 RGB PNGs on a black background holding 1-3 objects (the number is uniform over
  1, 2, 3). An object is a shape (circle, square, triangle) in one of 6 colours (red, green, blue,
  yellow, purple, orange), drawn without anti-aliasing so every object pixel has its colour's exact
  RGB value (``world.json`` lists them). Positions are the four quadrants (top left, top right,
  bottom left, bottom right), one object per quadrant; inside its 16x16 quadrant an object has a
  random size (9-12 px) and offset, so two images of the same scene differ. The objects of a scene
  are distinct (colour, shape) pairs.
- Captions list the objects in a fixed order (reading order of the quadrants), one template per
  object count: ``"a red circle at the top left."``, ``"a red circle at the top left and a blue
  square at the bottom right."``, ``"a red circle at the top left, a blue square at the top right
  and a green triangle at the bottom left."``
- Questions, one ``question_type`` each, asked only when they have a single answer:
  ``color``  "what color is the circle?" (the circle is the only circle)  -> a colour;
  ``shape``  "what shape is the red object?" (the only red object)       -> circle/square/triangle;
  ``count``  "how many objects are there?"                                -> "1", "2" or "3"
  (digits: LAVIS's VQA scorer maps a predicted "two" to "2" but never rewrites ground truth);
  ``yesno``  "is there a green triangle?" (yes for a present object, no for an absent pair, 50/50).

Scenes and splits
-----------------
A scene key is the sorted tuple of (quadrant, colour, shape) objects; there are 21,492 keys. A fixed
share of the keys of each object count (1 object: 6 keys, 2 objects: 5%, 3 objects: 3% per split) is
held out for val and for test (disjoint); their images are drawn from those keys only (keys repeat,
the rendering does not). Train images, the text corpus, the sentences and the QA triples are drawn
from the remaining keys, so no val/test scene appears in any training text.

Files under ``--out`` (paths in JSON files are relative to it)
--------------------------------------------------------------
- ``images/{train,val,test}/<id>.png``; ids are global 6-digit numbers, train first.
- ``captions_{split}.json``: ``[{"image": "images/train/000001.png", "caption", "image_id": "1"}]``
  (image_id is the decimal id as a string: LAVIS's captioning task calls ``int()`` on it).
- ``coco_gt_{val,test}.json``: COCO caption ground truth for pycocoevalcap (one caption per image).
- ``vqa_{val,test}_questions.json`` / ``vqa_{val,test}_annotations.json``: VQAv2 format (10
  identical answers; ``answer_type`` equals ``question_type`` so LAVIS's VQA task, which reports
  accuracy per answer type, reports it per question type); ``vqa_{val,test}.json``: LAVIS's eval
  list ``[{"question_id", "question", "image", "image_id", "answer": [a], "question_type"}]``;
  question_id = 10 * image_id + index of the question type. ``vqa_answer_list.json``: all answers.
- ``corpus.txt``: one text per line (default 40k): a caption, followed in ``qa_fraction`` of the
  lines by one question-answer pair in the evaluation format, e.g.
  ``a red circle at the top left. Question: what color is the circle? Short answer: red``: the answer
  ends the text, as it ends BLIP-2 OPT's generation (at ``"\\n"``) at evaluation.
  In ``context_fraction`` of the lines (default half) a context segment comes first: the caption,
  ``</s>``, then the line again or its question-answer pair alone, e.g.
  ``a red circle at the top left.</s>Question: what color is the circle? Short answer: red``. The
  frozen LM learns from these to read text that stands before its bos, where BLIP-2 puts the soft
  prompt (a pretrained OPT has that skill; a corpus of single captions would not teach it). (LAVIS's
  ``blip_caption`` processor strips "." and ":"; load the corpus with a processor that keeps them if
  the LM must see the exact evaluation prompt.)
- ``qa_triples.jsonl``: ``{"caption", "question", "answer", "question_type"}`` for every pair in the
  corpus (text only, for a stage-0 QA term); ``sentences.txt``: the caption of every corpus line.
- ``images/vision/<id>.png`` and ``vision_{pretrain,val}.json`` (``[{"image", "objects": [[quadrant,
  colour, shape], ...]}]``): ``n_vision`` unpaired images of training scenes with what each quadrant holds,
  for pretraining the image encoder (``vision_pretrain.py``; BLIP-2's image encoder is pretrained and
  frozen), and the val images' contents to check it. No caption is involved.
- ``world.json``: vocabulary, colours' RGB, seed, sizes, counts, the held-out keys' counts and the
  chance level (majority answer per question type; fractions, while LAVIS's VQA scorer reports
  percent) on the test split (``chance``) and on val (``chance_val``).

Every part uses its own random stream derived from the seed, so e.g. a different ``n_corpus`` leaves
the images unchanged. Output is byte-identical for the same arguments and Pillow version.
"""

import argparse
import itertools
import json
import os
import random
from collections import Counter

from PIL import Image, ImageDraw

from lavis_pformer.text import QA_PROMPT

IMAGE_SIZE = 32
BACKGROUND = (0, 0, 0)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrants, reading order
QUESTION_TYPES = ("color", "shape", "count", "yesno")
ANSWERS = {
    "color": list(COLOURS),
    "shape": list(SHAPES),
    "count": ["1", "2", "3"],
    "yesno": ["yes", "no"],
}
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
# keys held out per eval split, by object count: an int is a number of keys, a float a share
HELD_OUT = {1: 6, 2: 0.05, 3: 0.03}
QA_FORMAT = QA_PROMPT.format("{question}") + " {answer}"  # "Question: {question} Short answer: {answer}"
QUESTION_START = QA_PROMPT[: QA_PROMPT.index("{}")]  # "Question: "
SEGMENT_SEP = "</s>"  # OPT's bos / eos: separates a corpus line's context segment from the text after it

_CELL = IMAGE_SIZE // 2


# ---------------------------------------------------------------------------------------------
# scenes, captions, questions
# ---------------------------------------------------------------------------------------------

def all_scene_keys():
    """{n_objects: [key, ...]} for n = 1..3; a key is a tuple of (quadrant, colour, shape)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    keys = {}
    for n in (1, 2, 3):
        keys[n] = [
            tuple((p, c, s) for p, (c, s) in zip(quadrants, objs))
            for quadrants in itertools.combinations(range(len(POSITIONS)), n)
            for objs in itertools.permutations(pairs, n)
        ]
    return keys


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(key):
    """The caption of a scene: objects in quadrant order, one template per object count."""
    parts = [f"{_article(c)} {c} {s} at the {POSITIONS[p]}" for p, c, s in key]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def available_types(key):
    """Question types with a unique answer in this scene."""
    types = []
    shapes = Counter(s for _, _, s in key)
    colours = Counter(c for _, c, _ in key)
    if any(v == 1 for v in shapes.values()):
        types.append("color")
    if any(v == 1 for v in colours.values()):
        types.append("shape")
    return types + ["count", "yesno"]


def make_question(key, qtype, rng):
    """(question, answer) of type ``qtype`` about ``key``; the type must be available."""
    if qtype == "color":
        counts = Counter(s for _, _, s in key)
        shape = rng.choice([s for s in SHAPES if counts[s] == 1])
        colour = next(c for _, c, s in key if s == shape)
        return f"what color is the {shape}?", colour
    if qtype == "shape":
        counts = Counter(c for _, c, _ in key)
        colour = rng.choice([c for c in COLOURS if counts[c] == 1])
        shape = next(s for _, c, s in key if c == colour)
        return f"what shape is the {colour} object?", shape
    if qtype == "count":
        return "how many objects are there?", str(len(key))
    if qtype == "yesno":
        present = {(c, s) for _, c, s in key}
        if rng.random() < 0.5:
            _, colour, shape = rng.choice(key)
            answer = "yes"
        else:
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
            answer = "no"
        return f"is there {_article(colour)} {colour} {shape}?", answer
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def render(key, rng):
    """A 32x32 RGB image of the scene; sizes and offsets inside each quadrant come from ``rng``."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for p, colour, shape in key:
        size = rng.randint(9, 12)
        x0 = _CELL * (p % 2) + rng.randint(1, _CELL - 1 - size)
        y0 = _CELL * (p // 2) + rng.randint(1, _CELL - 1 - size)
        x1, y1 = x0 + size - 1, y0 + size - 1
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _with_context(lines, fraction, rng):
    """``fraction`` of the corpus lines get a context segment: ``caption </s> text about it``.

    The text after the separator is the whole line (the scene described again) or, for lines with a
    question, the question-answer pair alone. A language model trained on such lines reads what stands
    before its ``</s>`` (bos), which is where BLIP-2 puts the soft prompt.
    """
    out = []
    for line in lines:
        if rng.random() >= fraction:
            out.append(line)
            continue
        cap, sep, qa = line.partition(" " + QUESTION_START)
        second = QUESTION_START + qa if sep and rng.random() < 0.5 else line
        out.append(cap + SEGMENT_SEP + second)
    return out


def _split_keys(seed):
    """Scene pools: {"val": {n: keys}, "test": {n: keys}, "other": {n: keys}}."""
    rng = random.Random(f"shapes-world/{seed}/keys")
    pools = {"val": {}, "test": {}, "other": {}}
    for n, keys in all_scene_keys().items():
        keys = list(keys)
        rng.shuffle(keys)
        k = HELD_OUT[n] if isinstance(HELD_OUT[n], int) else max(1, round(HELD_OUT[n] * len(keys)))
        pools["val"][n], pools["test"][n], pools["other"][n] = keys[:k], keys[k : 2 * k], keys[2 * k :]
    return pools


def _draw_key(pool, rng):
    return rng.choice(pool[rng.randint(1, 3)])


def _chance(questions):
    """Majority answer per question type and the accuracy of answering it (fractions)."""
    per_type, hits = {}, 0
    for qtype in QUESTION_TYPES:
        counts = Counter(q["answer"] for q in questions if q["question_type"] == qtype)
        if not counts:
            continue
        answer, hit = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(counts.values())
        per_type[qtype] = {"majority_answer": answer, "accuracy": hit / total, "questions": total}
        hits += hit
    return {"per_type": per_type, "overall": hits / len(questions) if questions else None,
            "questions": len(questions)}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _coco_gt(split, seed, records):
    return {
        "info": {"description": f"shapes world captions, split {split}, seed {seed}", "version": "1.0"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": int(r["image_id"]), "file_name": r["image"]} for r in records],
        "annotations": [
            {"image_id": int(r["image_id"]), "caption": r["caption"], "id": i + 1}
            for i, r in enumerate(records)
        ],
    }


def _vqa_files(split, seed, questions):
    info = {"description": f"shapes world VQA, split {split}, seed {seed}", "version": "1.0"}
    licence = {"name": "generated", "url": ""}
    qfile = {
        "info": info, "task_type": "Open-Ended", "data_type": "shapes_world", "data_subtype": split,
        "license": licence,
        "questions": [
            {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
            for q in questions
        ],
    }
    afile = {
        "info": info, "license": licence, "data_type": "shapes_world", "data_subtype": split,
        "annotations": [
            {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                "question_type": q["question_type"],
                "answer_type": q["question_type"],
                "answers": [
                    {"answer": q["answer"], "answer_confidence": "yes", "answer_id": j + 1}
                    for j in range(10)
                ],
                "multiple_choice_answer": q["answer"],
            }
            for q in questions
        ],
    }
    lavis_list = [
        {
            "question_id": q["question_id"], "question": q["question"], "image": q["image"],
            "image_id": q["image_id"], "answer": [q["answer"]], "question_type": q["question_type"],
        }
        for q in questions
    ]
    return qfile, afile, lavis_list


def _write_split_images(out_dir, split, records, images):
    folder = os.path.join(out_dir, "images", split)
    os.makedirs(folder, exist_ok=True)
    keep = set()
    for rec, img in zip(records, images):
        name = os.path.basename(rec["image"])
        keep.add(name)
        img.save(os.path.join(folder, name), format="PNG")
    for name in os.listdir(folder):  # images of an earlier, larger run
        if name.endswith(".png") and name not in keep:
            os.remove(os.path.join(folder, name))


def generate(out_dir, seed=0, n_train=1000, n_val=200, n_test=200, n_corpus=40000, qa_fraction=0.9,
             n_vision=4000, context_fraction=0.5):
    """Write the shapes world under ``out_dir``; returns {name: absolute path}."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in list(sizes.items()) + [("corpus", n_corpus), ("vision", n_vision)]:
        if not isinstance(n, int) or n < (0 if name in ("corpus", "vision") else 1):
            raise ValueError(f"n_{name} must be an int >= {0 if name in ('corpus', 'vision') else 1}, got {n!r}")
    for name, value in (("qa_fraction", qa_fraction), ("context_fraction", context_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pools = _split_keys(seed)
    paths = {"root": out_dir}

    def p(name):
        paths[os.path.splitext(name)[0]] = os.path.join(out_dir, name)
        return paths[os.path.splitext(name)[0]]

    next_id, chance = 1, {}
    all_questions = {}
    for split in SPLITS:
        rng = random.Random(f"shapes-world/{seed}/{split}")
        pool = pools["other" if split == "train" else split]
        records, images, questions, keys = [], [], [], []
        for _ in range(sizes[split]):
            key = _draw_key(pool, rng)
            image_id, next_id = next_id, next_id + 1
            rel = f"images/{split}/{image_id:06d}.png"
            records.append({"image": rel, "caption": caption(key), "image_id": str(image_id)})
            keys.append(key)
            images.append(render(key, rng))
            if split == "train":
                continue
            for t, qtype in enumerate(QUESTION_TYPES):
                if qtype not in available_types(key):
                    continue
                question, answer = make_question(key, qtype, rng)
                questions.append({
                    "question_id": image_id * 10 + t, "image_id": image_id, "image": rel,
                    "question": question, "answer": answer, "question_type": qtype,
                })
        if split == "val":
            val_objects = [{"image": r["image"], "objects": [list(o) for o in k]} for r, k in zip(records, keys)]
        _write_split_images(out_dir, split, records, images)
        _dump(p(f"captions_{split}.json"), records)
        if split == "train":
            continue
        _dump(p(f"coco_gt_{split}.json"), _coco_gt(split, seed, records))
        qfile, afile, lavis_list = _vqa_files(split, seed, questions)
        _dump(p(f"vqa_{split}_questions.json"), qfile)
        _dump(p(f"vqa_{split}_annotations.json"), afile)
        _dump(p(f"vqa_{split}.json"), lavis_list)
        chance[split] = _chance(questions)
        all_questions[split] = questions
    _dump(p("vqa_answer_list.json"), [a for t in QUESTION_TYPES for a in ANSWERS[t]])

    rng = random.Random(f"shapes-world/{seed}/vision")
    vision, vision_images = [], []
    for _ in range(n_vision):
        key = _draw_key(pools["other"], rng)
        image_id, next_id = next_id, next_id + 1
        vision.append({"image": f"images/vision/{image_id:06d}.png", "objects": [list(o) for o in key]})
        vision_images.append(render(key, rng))
    _write_split_images(out_dir, "vision", vision, vision_images)
    _dump(p("vision_pretrain.json"), vision)
    _dump(p("vision_val.json"), val_objects)

    rng = random.Random(f"shapes-world/{seed}/corpus")
    corpus, sentences, triples = [], [], []
    for _ in range(n_corpus):
        key = _draw_key(pools["other"], rng)
        cap = caption(key)
        sentences.append(cap)
        if rng.random() >= qa_fraction:
            corpus.append(cap)
            continue
        qtype = rng.choice(available_types(key))
        question, answer = make_question(key, qtype, rng)
        triples.append(json.dumps({"caption": cap, "question": question, "answer": answer, "question_type": qtype}))
        corpus.append(cap + " " + QA_FORMAT.format(question=question, answer=answer))
    corpus = _with_context(corpus, context_fraction, random.Random(f"shapes-world/{seed}/context"))
    _write_lines(p("corpus.txt"), corpus)
    _write_lines(p("sentences.txt"), sentences)
    _write_lines(p("qa_triples.jsonl"), triples)

    words = set()
    for line in corpus:
        words.update(line.replace(SEGMENT_SEP, " ").replace(",", " ").replace(".", " ").replace("?", " ").replace(":", " ").split())
    world = {
        "name": "shapes_world",
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "background": list(BACKGROUND),
        "colours": {c: list(rgb) for c, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "position_kind": "quadrants (16x16 cells), objects listed in this order in captions",
        "question_types": list(QUESTION_TYPES),
        "answers": ANSWERS,
        "qa_format": QA_FORMAT,
        "qa_fraction": qa_fraction,
        "context_fraction": context_fraction,
        "splits": dict(sizes),
        "n_vision": n_vision,
        "counts": {
            "images": dict(sizes),
            "questions": {
                s: {t: sum(q["question_type"] == t for q in qs) for t in QUESTION_TYPES}
                for s, qs in all_questions.items()
            },
            "corpus_lines": len(corpus),
            "corpus_lines_with_qa": sum(QUESTION_START in line for line in corpus),
            "corpus_lines_with_context": sum(SEGMENT_SEP in line for line in corpus),
            "qa_triples": len(triples),
            "sentences": len(sentences),
            "scene_keys": {
                pool: {str(n): len(keys) for n, keys in by_n.items()} for pool, by_n in pools.items()
            },
        },
        "vocabulary": sorted(words),
        "chance": chance["test"],
        "chance_val": chance["val"],
        "files": {k: os.path.relpath(v, out_dir) for k, v in paths.items() if k != "root"},
    }
    _dump(p("world.json"), world)
    paths["images"] = os.path.join(out_dir, "images")
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000, help="train images (default 1000)")
    ap.add_argument("--n-val", type=int, default=200, help="val images (default 200)")
    ap.add_argument("--n-test", type=int, default=200, help="test images (default 200)")
    ap.add_argument("--n-corpus", type=int, default=40000, help="text corpus lines (default 40000)")
    ap.add_argument("--n-vision", type=int, default=4000, help="unpaired images for the image encoder (default 4000)")
    ap.add_argument("--qa-fraction", type=float, default=0.9,
                    help="share of corpus lines carrying question-answer pairs (default 0.9)")
    ap.add_argument("--context-fraction", type=float, default=0.5,
                    help="share of corpus lines with a context segment before </s> (default 0.5)")
    args = ap.parse_args(argv)
    paths = generate(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                     n_test=args.n_test, n_corpus=args.n_corpus, qa_fraction=args.qa_fraction,
                     n_vision=args.n_vision, context_fraction=args.context_fraction)
    with open(paths["world"], encoding="utf-8") as f:
        world = json.load(f)
    print(json.dumps({"out": paths["root"], "splits": world["splits"],
                      "questions": world["counts"]["questions"],
                      "corpus_lines": world["counts"]["corpus_lines"],
                      "chance_test": world["chance"]["overall"]}, indent=1))


if __name__ == "__main__":
    main()
