"""A synthetic "video world" for video captioning: clip features with structure, in VATEX's layout.

Command line::

    python -m lavis_pformer.synthetic.video_world --out DIR [--seed 0] [--n-train 200] [--n-val 40]
        [--n-test 40] [--feat-dim 1024] [--min-clips 4] [--max-clips 12] [--captions-per-video 4]
        [--noise 0.1]

Python: ``generate(out_dir, seed=0, ...)`` returns a dict of the absolute paths written. A video shows one
shapes-world object moving across a unit square; each clip's feature is a structured vector (colour, shape,
position, direction) through a fixed random projection, plus noise. The world and its files: docs/data.md.
"""

import argparse
import hashlib
import json
import os

import numpy as np

from lavis_pformer.synthetic.shapes_world import COLOURS, SHAPES

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
TEMPLATES = (
    "{article} {colour} {shape} moves {direction}.",
    "{article} {colour} {shape} is moving {direction}.",
    "the {colour} {shape} slides {direction}.",
    "{article} {colour} {shape} goes {direction}.",
)
GRID = 4
STRUCTURE = (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("position", GRID * GRID),
             ("motion", len(DIRECTIONS)), ("xy", 2), ("bias", 1))
STRUCT_DIM = sum(n for _, n in STRUCTURE)
SPLITS = ("train", "val", "test")


def _rng(*parts):
    digest = hashlib.sha256("/".join(map(str, ("video-world",) + parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def captions(colour, shape, direction, n, rng):
    """``n`` distinct captions of one video (templates in a random order)."""
    order = rng.permutation(len(TEMPLATES))[:n]
    return [TEMPLATES[i].format(article=_article(colour), colour=colour, shape=shape,
                                direction=DIRECTION_PHRASES[direction]) for i in order]


def all_captions():
    """Every distinct caption of the world (templates x colours x shapes x directions), sorted."""
    return sorted(t.format(article=_article(c), colour=c, shape=s, direction=DIRECTION_PHRASES[d])
                  for t in TEMPLATES for c in COLOURS for s in SHAPES for d in DIRECTIONS)


def unpaired_captions(seed, n):
    """``n`` captions of videos that are never rendered: colour, shape, direction and template drawn at random
    from the world's own text stream, so no video of any split is paired with them (text for a frozen LM or a
    stage-0 corpus). The same (seed, n) gives the same list; a larger ``n`` extends it."""
    rng = _rng(seed, "unpaired-text")
    out = []
    for _ in range(int(n)):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        out.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(
            article=_article(colour), colour=colour, shape=shape, direction=DIRECTION_PHRASES[direction]))
    return out


def structured_clips(colour, shape, direction, num_clips, rng):
    """[num_clips, STRUCT_DIM] structured description of the clips of one video."""
    dx, dy = DIRECTIONS[direction]
    distance = rng.uniform(0.4, 0.7)
    # start so that the whole path stays inside the unit square
    lo_x, hi_x = (distance, 1.0) if dx < 0 else (0.0, 1.0 - distance) if dx > 0 else (0.0, 1.0)
    lo_y, hi_y = (distance, 1.0) if dy < 0 else (0.0, 1.0 - distance) if dy > 0 else (0.0, 1.0)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    t = np.linspace(0.0, 1.0, num_clips)
    xs, ys = x0 + dx * distance * t, y0 + dy * distance * t
    clips = np.zeros((num_clips, STRUCT_DIM))
    colour_i, shape_i = list(COLOURS).index(colour), list(SHAPES).index(shape)
    motion_i = list(DIRECTIONS).index(direction)
    offsets = np.cumsum([0] + [n for _, n in STRUCTURE])
    for k in range(num_clips):
        cell = min(int(ys[k] * GRID), GRID - 1) * GRID + min(int(xs[k] * GRID), GRID - 1)
        clips[k, offsets[0] + colour_i] = 1
        clips[k, offsets[1] + shape_i] = 1
        clips[k, offsets[2] + cell] = 1
        clips[k, offsets[3] + motion_i] = 1
        clips[k, offsets[4]: offsets[4] + 2] = (xs[k], ys[k])
        clips[k, offsets[5]] = 1
    return clips


def projection(seed, feat_dim):
    """The fixed [STRUCT_DIM, feat_dim] matrix that turns structured clips into features."""
    return _rng(seed, "projection", feat_dim).normal(0.0, 1.0 / np.sqrt(STRUCT_DIM), (STRUCT_DIM, feat_dim))


def _dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def generate(out_dir, seed=0, n_train=200, n_val=40, n_test=40, feat_dim=1024, min_clips=4, max_clips=12,
             captions_per_video=4, noise=0.1):
    """Write the world under ``out_dir``; returns {"root", "features", "train", "val", "test", "sentences", "world"}."""
    for name, value, low in (("n_train", n_train, 0), ("n_val", n_val, 0), ("n_test", n_test, 0),
                             ("feat_dim", feat_dim, 1), ("min_clips", min_clips, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_clips < min_clips:
        raise ValueError(f"max_clips ({max_clips}) must be >= min_clips ({min_clips})")
    if not 1 <= captions_per_video <= len(TEMPLATES):
        raise ValueError(f"captions_per_video must be in 1..{len(TEMPLATES)}, got {captions_per_video}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    out_dir = os.path.abspath(out_dir)
    features_dir = os.path.join(out_dir, "features")
    os.makedirs(features_dir, exist_ok=True)
    matrix = projection(seed, feat_dim)
    paths = {"root": out_dir, "features": features_dir}
    index, train_sentences = 0, []
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        rng = _rng(seed, split)
        records = []
        for _ in range(n):
            index += 1
            video_id = f"video{index:06d}"
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            num_clips = int(rng.integers(min_clips, max_clips + 1))
            clips = structured_clips(colour, shape, direction, num_clips, rng)
            features = clips @ matrix + noise * rng.standard_normal((num_clips, feat_dim))
            np.save(os.path.join(features_dir, video_id + ".npy"), features.astype(np.float32))
            caps = captions(colour, shape, direction, captions_per_video, rng)
            records.append({"videoID": video_id, "enCap": caps})
            if split == "train":
                train_sentences.extend(caps)
        paths[split] = os.path.join(out_dir, f"vatex_{split}.json")
        _dump(paths[split], records)
    paths["sentences"] = os.path.join(out_dir, "sentences.txt")
    with open(paths["sentences"], "w", encoding="utf-8") as f:
        f.write("".join(s + "\n" for s in train_sentences))
    paths["world"] = os.path.join(out_dir, "world.json")
    _dump(paths["world"], {
        "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, "feat_dim": feat_dim,
        "min_clips": min_clips, "max_clips": max_clips, "captions_per_video": captions_per_video, "noise": noise,
        "structure": [[name, size] for name, size in STRUCTURE], "grid": GRID, "colours": list(COLOURS),
        "shapes": list(SHAPES), "directions": list(DIRECTIONS), "templates": list(TEMPLATES),
    })
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="output/tiny/video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--feat-dim", type=int, default=1024)
    parser.add_argument("--min-clips", type=int, default=4)
    parser.add_argument("--max-clips", type=int, default=12)
    parser.add_argument("--captions-per-video", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args(argv)
    paths = generate(args.out, args.seed, args.n_train, args.n_val, args.n_test, args.feat_dim, args.min_clips,
                     args.max_clips, args.captions_per_video, args.noise)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
