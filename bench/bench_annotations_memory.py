"""Start time and memory of caption annotations at scale: the plugin's compact ``local_caption`` train dataset (its
first start, which parses the file and writes the annotation cache, and a later start, which maps that cache) vs
LAVIS's own ``CaptionDataset`` (``json.load`` of the whole file, a dict per pair), on the same synthetic annotation
file, with R ranks x W DataLoader workers, at one or more sizes.

Each variant runs in its own ``torchrun`` (gloo, R processes on this machine). Every rank builds the dataset from
the file (start time: from the call to the dataset ready, on the slowest rank; in a first start one rank parses
while the others wait for its cache file), then iterates one epoch of its DistributedSampler share through a
DataLoader with W forked workers (``persistent_workers``), calling the dataset's own ``__getitem__`` with the image
decode replaced by a constant (the bench measures the annotation storage, not images; no image file exists).
Reading every record of the epoch is what a training epoch does to the annotation objects (LAVIS's dicts get their
reference counts written, so the workers' copy-on-write pages get copied). After the epoch, while the workers are
alive, each rank reads ``/proc/<pid>/smaps_rollup`` and ``/proc/<pid>/status`` of itself and of its workers:

- RSS, PSS (shared pages divided among the processes sharing them: the PSS of all processes adds up to what the
  run really holds), private (clean + dirty) bytes, and VmHWM (peak RSS; for the ranks: the build's peak).

A baseline process (the same imports, no dataset) is measured the same way, so the table also shows what the
annotations add. LAVIS's variant is not run above ``--lavis-max-pairs`` (a list of dicts per rank and a copy per
worker; the notes extrapolate its peak from a smaller size of the same run). Results:
``bench/results/bench_annotations_memory_cpu.{json,md}``.

    python bench/bench_annotations_memory.py                        # 4M pairs, 2 ranks x 2 workers
    python bench/bench_annotations_memory.py --pairs 4000000,40000000
    python bench/bench_annotations_memory.py --pairs 1000000 --ranks 2 --workers 4
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import reporting as R  # noqa: E402

SCRIPT = "bench_annotations_memory"
VARIANTS = {"lavis": "LAVIS CaptionDataset (json.load, list of dicts)",
            "first": "lavis_pformer local_caption, first start (parses, writes the cache)",
            "cached": "lavis_pformer local_caption, later start (maps the cache)",
            "baseline": "no dataset (imports only)"}
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")
WORDS = ("a an the of on in with and two three man woman dog cat bird car tree street table red green blue yellow "
         "white black small large old young sitting standing walking next to near above below front back people "
         "group field water beach city building room kitchen food plate grass sky snow road train bus").split()


# --- the synthetic file ---------------------------------------------------------------------------------------

def write_annotations(path, pairs, seed=0, shuffled=False):
    """A JSON list of ``pairs`` records, one caption per image (as CC3M / LAION): image "dddd/dddddddd.jpg",
    a caption of 8-14 words, an integer image_id; in the order of the ids (as img2dataset writes them), or in a
    random order (``shuffled``)."""
    import numpy as np

    rng = random.Random(seed)
    tmp = path + ".part"
    order = np.random.default_rng(seed).permutation(pairs) if shuffled else range(pairs)
    with open(tmp, "w") as f:
        f.write("[")
        for n, i in enumerate(int(i) for i in order):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            f.write(("," if n else "") + json.dumps({"image": f"{i // 1000:04d}/{i:08d}.jpg", "caption": caption,
                                                     "image_id": i}))
        f.write("]\n")
    os.replace(tmp, path)
    return path


# --- inside torchrun -----------------------------------------------------------------------------------------------

def memory(pid):
    """{field: bytes} of /proc/<pid>/smaps_rollup, plus VmHWM (peak RSS)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["VmHWM"] = int(line.split()[1]) * 1024
    out["Private"] = out["Private_Clean"] + out["Private_Dirty"]
    return out


class _ConstantImage:
    def convert(self, mode):
        return self


def build(variant, path):
    """The dataset with its image decode replaced by a constant (no image files exist)."""
    if variant == "lavis":
        import lavis.datasets.datasets.caption_datasets as caption_datasets
        from lavis.datasets.datasets.caption_datasets import CaptionDataset

        caption_datasets.Image = type("NoImages", (), {"open": staticmethod(lambda p: _ConstantImage())})
        return CaptionDataset(lambda image: 0, lambda text: text, "/images", [path])
    import lavis_pformer.datasets.local_image_text as local_image_text
    from lavis_pformer.datasets.local_image_text import LocalCaptionDataset

    local_image_text.load_rgb_image = lambda p: _ConstantImage()
    return LocalCaptionDataset(lambda image: 0, lambda text: text, "/images", [path])


class _Indices:
    """The baseline's dataset: items are their indices, nothing stored."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def count(batch):
    return len(batch)


class PeakAnon:
    """The largest RssAnon of this process (anonymous memory: not the pages of mapped files, which the page cache
    can drop) while in the ``with`` block, sampled every 20 ms by a thread."""

    def __enter__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            with open("/proc/self/status") as f:
                anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
            self.peak = max(self.peak, anon)
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_rank(args):
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    import lavis_pformer  # noqa: F401  (the same imports in every variant)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with PeakAnon() as anon:
        dataset = build(args.variant, args.file) if args.variant != "baseline" else _Indices(args.pairs)
    build_s = time.perf_counter() - start
    after_build = memory(os.getpid())
    if args.start_only:
        return _gather(args, {"rank": rank, "build_s": build_s, "build_peak_anon": anon.peak})
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=256, sampler=sampler, num_workers=args.workers, collate_fn=count,
                        persistent_workers=args.workers > 0)
    start = time.perf_counter()
    seen = 0
    iterator = iter(loader)
    for n in iterator:
        seen += n
    epoch_s = time.perf_counter() - start
    workers = [w.pid for w in getattr(iterator, "_workers", [])]
    result = {"rank": rank, "build_s": build_s, "build_peak_anon": anon.peak, "epoch_s": epoch_s, "samples": seen,
              "after_build": after_build,
              "main": memory(os.getpid()), "workers": [memory(pid) for pid in workers]}
    _gather(args, result)
    del iterator, loader


def _gather(args, result):
    """Rank 0 writes every rank's ``result`` to ``args.out``."""
    import torch.distributed as dist

    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------------------------

def run_variant(variant, args, pairs, path, workdir, start_only=False):
    """One torchrun of ``variant`` on the file of ``pairs`` pairs ("first" starts from an empty cache folder); with
    ``start_only`` the ranks build the dataset and stop (no epoch, no memory)."""
    out = os.path.join(workdir, f"{variant}_{pairs}.json")
    cache = os.path.join(workdir, f"cache_{pairs}")
    if variant == "first":
        shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
           str(_free_port()), os.path.abspath(__file__), "--rank-process", "--variant", variant, "--file", path,
           "--workers", str(args.workers), "--pairs", str(pairs), "--out", out]
    cmd += ["--start-only"] if start_only else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=C.REPO, LAVIS_PFORMER_CACHE=cache)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = json.load(open(out))
    return {"variant": variant, "pairs": pairs, "description": VARIANTS[variant], "wall_s": time.perf_counter() - start,
            "ranks": ranks}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(result):
    ranks = result["ranks"]
    mains = [r["main"] for r in ranks]
    workers = [w for r in ranks for w in r["workers"]]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows) if rows else 0.0  # noqa: E731
    return {
        "rank_rss": mean(mains, "Rss"), "rank_pss": mean(mains, "Pss"), "rank_private": mean(mains, "Private"),
        "rank_peak_rss": max(m["VmHWM"] for m in mains), "rank_build_peak_anon": max(r["build_peak_anon"] for r in ranks),
        "rank_after_build_rss": mean([r["after_build"] for r in ranks], "Rss"),
        "worker_rss": mean(workers, "Rss"), "worker_pss": mean(workers, "Pss"), "worker_private": mean(workers, "Private"),
        "total_pss": sum(m["Pss"] for m in mains) + sum(w["Pss"] for w in workers),
        "processes": len(mains) + len(workers), "build_s": statistics.median(result["starts"]),
        "epoch_s": max(r["epoch_s"] for r in ranks), "samples": sum(r["samples"] for r in ranks),
    }


def table(sizes, args):
    """One row per size and variant (``sizes``: {pairs: {variant: result}}); LAVIS above --lavis-max-pairs: not
    measured."""
    mb = lambda b: f"{b / R.MB:,.0f}"  # noqa: E731
    headers = ["pairs", "dataset", "start s", "rank PSS MB", "rank private MB", "rank peak RSS MB",
               "rank peak anon MB (start)", "worker PSS MB", "worker private MB",
               f"total PSS MB ({args.ranks} rank(s) + {args.ranks * args.workers} workers)", "above baseline MB",
               "epoch s"]
    rows = []
    for pairs, results in sizes.items():
        base = results.get("baseline")
        for variant in VARIANTS:
            if variant == "lavis" and variant not in results and pairs > args.lavis_max_pairs:
                rows.append([f"{pairs:,}", VARIANTS[variant]] + ["not measured (see notes)"] + [""] * 9)
            if variant not in results:
                continue
            s = results[variant]["summary"]
            above = s["total_pss"] - base["summary"]["total_pss"] if base and variant != "baseline" else None
            rows.append([f"{pairs:,}", VARIANTS[variant], f"{s['build_s']:.1f}" if variant != "baseline" else "",
                         mb(s["rank_pss"]), mb(s["rank_private"]), mb(s["rank_peak_rss"]),
                         mb(s["rank_build_peak_anon"]), mb(s["worker_pss"]),
                         mb(s["worker_private"]), mb(s["total_pss"]), "" if above is None else mb(above),
                         f"{s['epoch_s']:.1f}"])
    return R.markdown_table(headers, rows)


NOTES = [
    "start s: from the dataset's constructor called to its return, on the slowest rank (in a first start one rank "
    "parses and writes the cache file while the others wait for it, then all map it); the median of the start of the "
    "memory run and of --start-rounds more starts (each its own torchrun, the order reversed every other round).",
    "PSS: each shared page counted 1/N in each of the N processes that map it, so the total PSS of all processes is "
    "what the run holds; private = pages only this process maps (for a forked worker: the copy-on-write copies it "
    "made); rank peak RSS = VmHWM of the rank that peaked highest (it counts the pages of mapped files: the JSON file "
    "the parser maps, the cache file); peak anon = the largest anonymous RSS (RssAnon, sampled every 20 ms) during "
    "the start, of the rank that peaked highest.",
    "Every rank read every record of its epoch share through its workers (the dataset's own __getitem__, image decode "
    "replaced by a constant); measured after the epoch with the workers alive (persistent_workers).",
]


def annotation_file(workdir, pairs, shuffled=False):
    """The synthetic annotation file of ``pairs`` pairs in ``workdir``, written unless it is there (kept for reruns)."""
    path = os.path.join(workdir, f"captions_{'shuffled_' if shuffled else ''}{pairs}.json")
    if not os.path.isfile(path):
        start = time.perf_counter()
        write_annotations(path, pairs, shuffled=shuffled)
        print(f"wrote {path} ({os.path.getsize(path) / R.MB:,.0f} MB) in {time.perf_counter() - start:.0f} s",
              flush=True)
    return path


def start_rounds(results, args, pairs, path, workdir):
    """``--start-rounds`` more starts of each variant that ran (not the baseline), each its own torchrun that stops
    once the dataset is built, the order reversed every other round; appended to each result's ``starts``."""
    variants = [v for v in VARIANTS if v in results and v != "baseline"]
    for r in range(args.start_rounds):
        for variant in (variants if r % 2 else variants[::-1]):
            run = run_variant(variant, args, pairs, path, workdir, start_only=True)
            results[variant]["starts"].append(max(rank["build_s"] for rank in run["ranks"]))
        print(f"{pairs:,} start round {r + 1}: " + ", ".join(f"{v} {results[v]['starts'][-1]:.1f} s"
                                                             for v in variants), flush=True)


def lavis_not_measured(pairs, sizes, args):
    """Why LAVIS's variant did not run at ``pairs``, with its memory extrapolated from a smaller size of this run."""
    why = f"LAVIS at {pairs:,} pairs: not measured (above --lavis-max-pairs {args.lavis_max_pairs:,})."
    measured = [(p, r) for p, r in sizes.items() if "lavis" in r and "baseline" in r]
    if measured:
        p, results = measured[-1]
        lv, base = results["lavis"]["summary"], results["baseline"]["summary"]
        per_pair = (lv["total_pss"] - base["total_pss"]) / p
        why += (f" At {p:,} pairs its annotations held {per_pair:,.0f} bytes per pair above the baseline (total PSS "
                f"of {args.ranks} rank(s) + {args.ranks * args.workers} workers): about "
                f"{per_pair * pairs / 2 ** 30:,.0f} GiB at {pairs:,}, more than this machine's memory.")
    return why


def ratios(results):
    """Of one size: start time and memory of the plugin's first and later starts over LAVIS's (when both ran), and
    the memory above the baseline."""
    out = {}
    if "lavis" not in results:
        return out
    lv = results["lavis"]["summary"]
    for variant in ("first", "cached"):
        if variant not in results:
            continue
        ours = results[variant]["summary"]
        out[f"{variant}_start"] = ours["build_s"] / lv["build_s"]
        paired = [a / b for a, b in zip(results[variant]["starts"], results["lavis"]["starts"])]  # round by round
        out[f"{variant}_start_paired_min"], out[f"{variant}_start_paired_max"] = min(paired), max(paired)
        out.update({f"{variant}_{k}": ours[k] / lv[k] for k in ("total_pss", "rank_peak_rss", "rank_build_peak_anon")
                    if lv[k]})
        if "baseline" in results:
            b = results["baseline"]["summary"]["total_pss"]
            out[f"{variant}_above_baseline"] = (ours["total_pss"] - b) / (lv["total_pss"] - b)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="4000000", help="pairs of the synthetic file; several: comma-separated")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", default="lavis,first,cached,baseline")
    parser.add_argument("--start-rounds", type=int, default=2,
                        help="more starts of each variant (start time only) after the memory runs; the table gives "
                             "the median")
    parser.add_argument("--lavis-max-pairs", type=int, default=10_000_000,
                        help="LAVIS's variant is not run above this size (a list of dicts per rank, a copy per worker)")
    parser.add_argument("--shuffled", action="store_true",
                        help="records in a random order (default: in the order of their ids, as img2dataset writes "
                             "them)")
    parser.add_argument("--workdir", default=None, help="where the annotation files are written (kept for reruns)")
    parser.add_argument("--results-dir", default=C.RESULTS_DIR)
    parser.add_argument("--tag", default="")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--start-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_process:
        args.pairs = int(args.pairs)
        return run_rank(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: choose from {sorted(VARIANTS)}")
    if "cached" in variants and "first" not in variants:
        raise SystemExit("--variants: 'cached' maps the cache file that 'first' writes; give both")
    args.device = "cpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_annotations_")
    os.makedirs(workdir, exist_ok=True)
    sizes, files, notes = {}, {}, list(NOTES)
    for pairs in [int(p) for p in args.pairs.split(",")]:
        files[pairs] = annotation_file(workdir, pairs, args.shuffled)
        sizes[pairs] = {}
        for variant in variants:
            if variant == "lavis" and pairs > args.lavis_max_pairs:
                notes.append(lavis_not_measured(pairs, sizes, args))
                continue
            result = run_variant(variant, args, pairs, files[pairs], workdir)
            result["starts"] = [max(r["build_s"] for r in result["ranks"])]
            sizes[pairs][variant] = result
        start_rounds(sizes[pairs], args, pairs, files[pairs], workdir)
        for variant, result in sizes[pairs].items():
            result["summary"] = s = summarize(result)
            print(f"{pairs:,} {variant}: start {s['build_s']:.1f} s (median of {len(result['starts'])}), rank PSS "
                  f"{s['rank_pss'] / R.MB:,.0f} MB, worker PSS {s['worker_pss'] / R.MB:,.0f} MB, total PSS "
                  f"{s['total_pss'] / R.MB:,.0f} MB", flush=True)
    machine = R.machine_info("cpu")
    order = "records in random order" if args.shuffled else "records in id order"
    sizes_line = (", ".join(f"{p:,} pairs ({os.path.getsize(f) / R.MB:,.0f} MB JSON list)" for p, f in files.items())
                  + f", {order}, {args.ranks} rank(s) x {args.workers} worker(s), gloo, fork")
    all_ratios = {pairs: ratios(results) for pairs, results in sizes.items()}
    for pairs, found in all_ratios.items():
        if found:
            notes.append(f"{pairs:,} pairs, lavis_pformer / LAVIS: " + ", ".join(f"{k} {v:.3f}x" for k, v in
                                                                             found.items()))
    hidden = ("rank_process", "variant", "file", "out", "start_only")
    recorded = {k: v for k, v in vars(args).items() if k not in hidden}
    payload = dict(machine=machine, sizes_line=sizes_line, args=recorded,
                   argv=argv, annotation_file_bytes={p: os.path.getsize(f) for p, f in files.items()},
                   ratios=all_ratios, results=[r for results in sizes.values() for r in results.values()])
    R.publish(SCRIPT, args, machine, sizes_line, table(sizes, args), notes, payload)
    return payload


if __name__ == "__main__":
    main()
