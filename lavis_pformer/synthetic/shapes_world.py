"""A synthetic "shapes world" generated from a seed (nothing downloaded): 32x32 images of 1-3 coloured shapes,
their captions, VQA questions, a text corpus and unpaired images. docs/demo.md describes the world and its files.

Command line::

    python -m lavis_pformer.synthetic.shapes_world --out DIR [--seed 0] [--n-train 1000] [--n-val 200]
        [--n-test 200] [--n-corpus 40000] [--qa-fraction 0.9] [--n-vision 4000]

Python: ``generate(out_dir, seed=0, ...)`` returns a dict of the absolute paths written. Every part uses its own
random stream derived from the seed; output is byte-identical for the same arguments and Pillow version.
"""
import argparse
import itertools
import json
import os
import random
from collections import Counter

from PIL import Image, ImageDraw

from lavis_pformer.synthetic.shapes_files import coco_gt, dump_json, vqa_files, write_images, write_lines
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
OOD_SPLIT = "test_ood"  # scenes with a held-out (colour, shape) pair (``held_out_pairs`` > 0)
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
    """A key of ``pool`` ({n: keys}): the object count uniform over the counts present, then a key."""
    counts = sorted(pool)
    n = rng.randint(1, 3) if counts == [1, 2, 3] else rng.choice(counts)
    return rng.choice(pool[n])


def choose_held_out_pairs(seed, n):
    """``n`` (colour, shape) pairs (at most one per colour and per shape, so that every colour and every shape
    still appears in paired data), chosen by the seed; sorted."""
    if not 0 <= n <= len(SHAPES):
        raise ValueError(f"held_out_pairs must be an int in 0..{len(SHAPES)}, got {n!r}")
    rng = random.Random(f"shapes-world/{seed}/held-out-pairs")
    colours = rng.sample(list(COLOURS), n)
    shapes = rng.sample(list(SHAPES), n)
    return sorted(zip(colours, shapes))


def has_pair(key, pairs):
    """Whether scene ``key`` holds one of the (colour, shape) ``pairs``."""
    return any((c, s) in pairs for _, c, s in key)


def _filter_pool(pool, pairs, keep_with):
    """The keys of ``pool`` ({n: keys}) that hold one of ``pairs`` (``keep_with``) or none of them; object
    counts left without keys are dropped."""
    out = {n: [k for k in keys if has_pair(k, pairs) == keep_with] for n, keys in pool.items()}
    return {n: keys for n, keys in out.items() if keys}


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
# generating
# ---------------------------------------------------------------------------------------------

def _check_arguments(sizes, n_corpus, n_vision, qa_fraction, context_fraction):
    for name, n in list(sizes.items()) + [("corpus", n_corpus), ("vision", n_vision)]:
        if not isinstance(n, int) or n < (0 if name in ("corpus", "vision") else 1):
            raise ValueError(f"n_{name} must be an int >= {0 if name in ('corpus', 'vision') else 1}, got {n!r}")
    for name, value in (("qa_fraction", qa_fraction), ("context_fraction", context_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


class _Files:
    """The files written under ``root``, by name (their order is world.json's ``files`` order)."""

    def __init__(self, root):
        self.paths = {"root": root}

    def path(self, name):
        key = os.path.splitext(name)[0]
        self.paths[key] = os.path.join(self.paths["root"], name)
        return self.paths[key]


def _draw_split(split, n, pool, first_id, rng):
    """``n`` scenes of ``pool``: (caption records, images, questions (none for train), scene keys)."""
    records, images, questions, keys = [], [], [], []
    for image_id in range(first_id, first_id + n):
        key = _draw_key(pool, rng)
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
    return records, images, questions, keys


def _write_split(files, seed, split, n, pool, first_id):
    """Images, captions and (for an eval split) the VQA files of one split; returns (questions, records, keys)."""
    rng = random.Random(f"shapes-world/{seed}/{split}")
    records, images, questions, keys = _draw_split(split, n, pool, first_id, rng)
    write_images(files.paths["root"], split, records, images)
    dump_json(files.path(f"captions_{split}.json"), records)
    if split != "train":
        dump_json(files.path(f"coco_gt_{split}.json"), coco_gt(split, seed, records))
        qfile, afile, lavis_list = vqa_files(split, seed, questions)
        dump_json(files.path(f"vqa_{split}_questions.json"), qfile)
        dump_json(files.path(f"vqa_{split}_annotations.json"), afile)
        dump_json(files.path(f"vqa_{split}.json"), lavis_list)
    return questions, records, keys


def _write_splits(files, seed, pools, sizes):
    """Images, captions and (val, test) VQA files of the splits; returns ({split: questions}, the val images'
    contents, the next free image id)."""
    next_id, questions = 1, {}
    for split in SPLITS:
        pool = pools["other" if split == "train" else split]
        split_questions, records, keys = _write_split(files, seed, split, sizes[split], pool, next_id)
        next_id += sizes[split]
        if split == "val":
            val_objects = [{"image": r["image"], "objects": [list(o) for o in k]} for r, k in zip(records, keys)]
        if split != "train":
            questions[split] = split_questions
    dump_json(files.path("vqa_answer_list.json"), [a for t in QUESTION_TYPES for a in ANSWERS[t]])
    return questions, val_objects, next_id


def _write_vision(files, seed, pools, n_vision, first_id, val_objects):
    """``n_vision`` unpaired training-scene images with their contents, and the val images' contents."""
    rng = random.Random(f"shapes-world/{seed}/vision")
    vision, vision_images = [], []
    for image_id in range(first_id, first_id + n_vision):
        key = _draw_key(pools["other"], rng)
        vision.append({"image": f"images/vision/{image_id:06d}.png", "objects": [list(o) for o in key]})
        vision_images.append(render(key, rng))
    write_images(files.paths["root"], "vision", vision, vision_images)
    dump_json(files.path("vision_pretrain.json"), vision)
    dump_json(files.path("vision_val.json"), val_objects)


def _write_texts(files, seed, pools, n_corpus, qa_fraction, context_fraction):
    """corpus.txt, sentences.txt and qa_triples.jsonl; returns (corpus lines, sentences, triples)."""
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
    write_lines(files.path("corpus.txt"), corpus)
    write_lines(files.path("sentences.txt"), sentences)
    write_lines(files.path("qa_triples.jsonl"), triples)
    return corpus, sentences, triples


def _world_json(files, seed, sizes, n_vision, qa_fraction, context_fraction, pools, questions, texts):
    """world.json's content: the world's definition, sizes, counts, vocabulary and chance levels."""
    corpus, sentences, triples = texts
    words = set()
    for line in corpus:
        words.update(line.replace(SEGMENT_SEP, " ").replace(",", " ").replace(".", " ").replace("?", " ").replace(":", " ").split())
    return {
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
                for s, qs in questions.items()
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
        "chance": _chance(questions["test"]),
        "chance_val": _chance(questions["val"]),
        "files": {k: os.path.relpath(v, files.paths["root"]) for k, v in files.paths.items() if k != "root"},
    }


def generate(out_dir, seed=0, n_train=1000, n_val=200, n_test=200, n_corpus=40000, qa_fraction=0.9,
             n_vision=4000, context_fraction=0.5, held_out_pairs=0, n_test_ood=None):
    """Write the shapes world under ``out_dir``; returns {name: absolute path}.

    ``held_out_pairs`` > 0 keeps that many (colour, shape) pairs (``choose_held_out_pairs``) out of every
    paired split (train, val, test) while the text corpus and the unpaired images still hold them, and writes
    an out-of-domain split ``test_ood`` (``n_test_ood`` images, default ``n_test``) of held-out test scenes
    that each hold at least one of them. With 0 (the default) the world is the demo's, byte for byte.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_arguments(sizes, n_corpus, n_vision, qa_fraction, context_fraction)
    held = choose_held_out_pairs(seed, held_out_pairs)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pools = _split_keys(seed)
    paired = {name: _filter_pool(pool, held, keep_with=False) for name, pool in pools.items()}
    files = _Files(out_dir)
    questions, val_objects, next_id = _write_splits(files, seed, paired, sizes)
    _write_vision(files, seed, pools, n_vision, next_id, val_objects)
    texts = _write_texts(files, seed, pools, n_corpus, qa_fraction, context_fraction)
    counted = pools
    if held:
        sizes[OOD_SPLIT] = n_test if n_test_ood is None else n_test_ood
        ood_pool = _filter_pool(pools["test"], held, keep_with=True)
        questions[OOD_SPLIT], _, _ = _write_split(files, seed, OOD_SPLIT, sizes[OOD_SPLIT], ood_pool,
                                                  next_id + n_vision)
        counted = dict(paired, test_ood=ood_pool)
    world = _world_json(files, seed, sizes, n_vision, qa_fraction, context_fraction, counted, questions, texts)
    if held:
        world["held_out_pairs"] = [list(p) for p in held]
        world["chance_test_ood"] = _chance(questions[OOD_SPLIT])
    dump_json(files.path("world.json"), world)
    paths = files.paths
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
    ap.add_argument("--held-out-pairs", type=int, default=0,
                    help="(colour, shape) pairs kept out of the paired splits, for an out-of-domain test split")
    ap.add_argument("--n-test-ood", type=int, default=None, help="out-of-domain test images (default --n-test)")
    args = ap.parse_args(argv)
    paths = generate(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                     n_test=args.n_test, n_corpus=args.n_corpus, qa_fraction=args.qa_fraction,
                     n_vision=args.n_vision, context_fraction=args.context_fraction,
                     held_out_pairs=args.held_out_pairs, n_test_ood=args.n_test_ood)
    with open(paths["world"], encoding="utf-8") as f:
        world = json.load(f)
    print(json.dumps({"out": paths["root"], "splits": world["splits"],
                      "questions": world["counts"]["questions"],
                      "corpus_lines": world["counts"]["corpus_lines"],
                      "chance_test": world["chance"]["overall"]}, indent=1))


if __name__ == "__main__":
    main()
