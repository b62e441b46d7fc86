"""Start time of stage 0's sentence corpus at scale, one process, on the same synthetic file per format:

- **line index**: a line-by-line pass that keeps the byte offset of each non-blank line (``json.loads`` of each JSON
  line): how ``sentence_corpus`` started before its cache, at every start of every rank. Written here as a
  reference;
- **first start**: ``SentenceCorpusDataset`` with an empty cache folder (parses the file, writes the cache file);
- **later start**: the same with the cache file present (maps it).

Every round runs the three in turn (the order reverses every other round); the table gives the median of each and
the ratios of the medians. Results: ``bench/results/bench_sentence_corpus_start_cpu.{json,md}``.

    python bench/bench_sentence_corpus_start.py                  # 12M lines, .txt and .jsonl, 1 round
    python bench/bench_sentence_corpus_start.py --lines 1000000 --repeats 3
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import reporting as R  # noqa: E402
from bench_annotations_memory import WORDS  # noqa: E402

SCRIPT = "bench_sentence_corpus_start"
VARIANTS = ("line index", "first start", "later start")


def write_corpus(path, lines, fmt, seed=0):
    """``lines`` sentences of 8-14 words, one per line: plain text or {"caption": ...} JSON lines."""
    rng = random.Random(seed)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        for _ in range(lines):
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            f.write((json.dumps({"caption": sentence}) if fmt == "jsonl" else sentence) + "\n")
    os.replace(tmp, path)
    return path


def line_index(path, fmt):
    """Byte offsets of the non-blank lines (the reference: one Python step and, for JSON, one json.loads per line)."""
    offsets, pos = array("q"), 0
    with open(path, "rb") as f:
        for raw in f:
            start, pos = pos, pos + len(raw)
            if raw.strip():
                text = json.loads(raw)["caption"] if fmt == "jsonl" else raw.decode("utf-8")
                if text.strip():
                    offsets.append(start)
    return offsets


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def one_round(path, fmt, cache, order):
    from lavis_pformer.datasets.sentence_corpus import SentenceCorpusDataset

    times, sizes = {}, {}
    for variant in order:
        if variant == "line index":
            times[variant], offsets = timed(lambda: line_index(path, fmt))
            sizes["offsets_bytes"] = len(offsets) * offsets.itemsize
            del offsets
            continue
        if variant == "first start":
            shutil.rmtree(cache, ignore_errors=True)
        elif not os.path.isdir(cache):  # a later start needs the file a first start wrote
            SentenceCorpusDataset(None, [path], cache_dir=cache)
        times[variant], dataset = timed(lambda: SentenceCorpusDataset(None, [path], cache_dir=cache))
        sizes["cache_file_bytes"] = os.path.getsize(dataset.sources[0].table.path)
        sizes["sentences"] = len(dataset)
        del dataset
    return times, sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=12_000_000)
    parser.add_argument("--formats", default="txt,jsonl")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the corpus files are written (kept for reruns)")
    parser.add_argument("--results-dir", default=C.RESULTS_DIR)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    C.quiet()
    args.device = "cpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_sentences_")
    os.makedirs(workdir, exist_ok=True)
    results, rows, notes = [], [], []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        path = os.path.join(workdir, f"sentences_{args.lines}.{fmt}")
        if not os.path.isfile(path):
            write_corpus(path, args.lines, fmt)
        cache = os.path.join(workdir, f"cache_{fmt}")
        rounds = []
        for r in range(args.repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            times, sizes = one_round(path, fmt, cache, order)
            rounds.append(times)
            print(f"{fmt} round {r}: " + ", ".join(f"{v} {times[v]:.2f} s" for v in VARIANTS), flush=True)
        median = {v: statistics.median(t[v] for t in rounds) for v in VARIANTS}
        ratio = {v: median[v] / median["line index"] for v in VARIANTS[1:]}
        results.append({"format": fmt, "lines": args.lines, "file_bytes": os.path.getsize(path), "rounds": rounds,
                        "median_s": median, "ratio_to_line_index": ratio, **sizes})
        rows.append([fmt, f"{sizes['sentences']:,}", f"{os.path.getsize(path) / R.MB:,.0f}",
                     f"{median['line index']:.2f}", f"{median['first start']:.2f}", f"{median['later start']:.4f}",
                     f"{ratio['first start']:.2f}x", f"{ratio['later start']:.5f}x",
                     f"{sizes['offsets_bytes'] / R.MB:,.0f}", f"{sizes['cache_file_bytes'] / R.MB:,.0f}"])
    table = R.markdown_table(["format", "sentences", "file MB", "line index s", "first start s", "later start s",
                              "first / line index", "later / line index", "line offsets MB (per rank)",
                              "cache file MB (shared)"], rows)
    notes += [f"median of {args.repeats} round(s); the order of the three reverses every other round.",
              "line index: kept lines' int64 offsets, private to each rank, the text read from the file at every item; "
              "cache file: the stripped sentences and their offsets, mapped and shared by the processes of a machine."]
    machine = R.machine_info("cpu")
    sizes_line = f"{args.lines:,} lines per file, formats {args.formats}, 1 process"
    payload = dict(machine=machine, sizes_line=sizes_line, args=R.args_record(args), argv=argv, results=results)
    R.publish(SCRIPT, args, machine, sizes_line, table, notes, payload)
    return payload


if __name__ == "__main__":
    main()
