"""Resident memory per process of caption annotations at scale: the plugin's compact ``local_caption`` train dataset
vs LAVIS's own ``CaptionDataset``, on the same synthetic annotation file, with R ranks x W DataLoader workers.

Each variant runs in its own ``torchrun`` (gloo, R processes on this machine). Every rank builds the dataset from
the file, then iterates one epoch of its DistributedSampler share through a DataLoader with W forked workers
(``persistent_workers``), calling the dataset's own ``__getitem__`` with the image decode replaced by a constant
(the bench measures the annotation storage, not images; no image file exists). Reading every record of the
epoch is what a training epoch does to the annotation objects (LAVIS's dicts get their reference counts written,
so the workers' copy-on-write pages get copied). After the epoch, while the workers are alive, each rank reads
``/proc/<pid>/smaps_rollup`` and ``/proc/<pid>/status`` of itself and of its workers:

- RSS, PSS (shared pages divided among the processes sharing them: the PSS of all processes adds up to what the
  run really holds), private (clean + dirty) bytes, and VmHWM (peak RSS; for the ranks: the build's peak).

A baseline process (the same imports, no dataset) is measured the same way, so the table also shows what the
annotations add. Results: ``bench/results/bench_annotations_memory_cpu.{json,md}``.

    python bench/bench_annotations_memory.py                        # 4M pairs, 2 ranks x 2 workers
    python bench/bench_annotations_memory.py --pairs 1000000 --ranks 2 --workers 4
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import reporting as R  # noqa: E402

SCRIPT = "bench_annotations_memory"
VARIANTS = {"lavis": "LAVIS CaptionDataset (list of dicts)", "compact": "lavis_pformer LocalCaptionDataset (compact)",
            "baseline": "no dataset (imports only)"}
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")
WORDS = ("a an the of on in with and two three man woman dog cat bird car tree street table red green blue yellow "
         "white black small large old young sitting standing walking next to near above below front back people "
         "group field water beach city building room kitchen food plate grass sky snow road train bus").split()


# --- the synthetic file ---------------------------------------------------------------------------------------

def write_annotations(path, pairs, seed=0):
    """A JSON list of ``pairs`` records, one caption per image (as CC3M / LAION): image "dddd/dddddddd.jpg",
    a caption of 8-14 words, an integer image_id."""
    rng = random.Random(seed)
    tmp = path + ".part"
    with open(tmp, "w") as f:
        f.write("[")
        for i in range(pairs):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            f.write(("," if i else "") + json.dumps({"image": f"{i // 1000:04d}/{i:08d}.jpg", "caption": caption,
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


def run_rank(args):
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    import lavis_pformer  # noqa: F401  (the same imports in every variant)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = build(args.variant, args.file) if args.variant != "baseline" else _Indices(args.pairs)
    build_s = time.perf_counter() - start
    after_build = memory(os.getpid())
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
    result = {"rank": rank, "build_s": build_s, "epoch_s": epoch_s, "samples": seen, "after_build": after_build,
              "main": memory(os.getpid()), "workers": [memory(pid) for pid in workers]}
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    del iterator, loader
    dist.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------------------------

def run_variant(variant, args, path, workdir):
    out = os.path.join(workdir, f"{variant}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
           str(_free_port()), os.path.abspath(__file__), "--rank-process", "--variant", variant, "--file", path,
           "--workers", str(args.workers), "--pairs", str(args.pairs), "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=C.REPO)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = json.load(open(out))
    return {"variant": variant, "description": VARIANTS[variant], "wall_s": time.perf_counter() - start,
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
        "rank_peak_rss": mean(mains, "VmHWM"), "rank_after_build_rss": mean([r["after_build"] for r in ranks], "Rss"),
        "worker_rss": mean(workers, "Rss"), "worker_pss": mean(workers, "Pss"), "worker_private": mean(workers, "Private"),
        "total_pss": sum(m["Pss"] for m in mains) + sum(w["Pss"] for w in workers),
        "processes": len(mains) + len(workers), "build_s": max(r["build_s"] for r in ranks),
        "epoch_s": max(r["epoch_s"] for r in ranks), "samples": sum(r["samples"] for r in ranks),
    }


def table(results, args):
    mb = lambda b: f"{b / R.MB:,.0f}"  # noqa: E731
    base = results.get("baseline")
    headers = ["dataset", "rank RSS MB", "rank PSS MB", "rank private MB", "rank peak RSS MB (build)",
               "worker RSS MB", "worker PSS MB", "worker private MB", f"total PSS MB ({args.ranks} ranks + "
               f"{args.ranks * args.workers} workers)", "above baseline MB", "build s", "epoch s"]
    rows = []
    for variant in ("lavis", "compact", "baseline"):
        if variant not in results:
            continue
        s = results[variant]["summary"]
        above = s["total_pss"] - base["summary"]["total_pss"] if base and variant != "baseline" else None
        rows.append([VARIANTS[variant], mb(s["rank_rss"]), mb(s["rank_pss"]), mb(s["rank_private"]),
                     mb(s["rank_peak_rss"]), mb(s["worker_rss"]), mb(s["worker_pss"]), mb(s["worker_private"]),
                     mb(s["total_pss"]), "" if above is None else mb(above), f"{s['build_s']:.1f}",
                     f"{s['epoch_s']:.1f}"])
    return R.markdown_table(headers, rows)


NOTES = [
    "PSS: each shared page counted 1/N in each of the N processes that map it, so the total PSS of all processes is "
    "what the run holds; private = pages only this process maps (for a forked worker: the copy-on-write copies it "
    "made); rank peak RSS = VmHWM, reached while building the dataset.",
    "Every rank read every record of its epoch share through its workers (the dataset's own __getitem__, image decode "
    "replaced by a constant); measured after the epoch with the workers alive (persistent_workers).",
]


def annotation_file(workdir, pairs):
    """The synthetic annotation file of ``pairs`` pairs in ``workdir``, written unless it is there (kept for reruns)."""
    path = os.path.join(workdir, f"captions_{pairs}.json")
    if not os.path.isfile(path):
        start = time.perf_counter()
        write_annotations(path, pairs)
        print(f"wrote {path} ({os.path.getsize(path) / R.MB:,.0f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def compact_ratios(results):
    """compact / LAVIS of the memory summaries (and of the totals above the baseline), when both ran."""
    if "lavis" not in results or "compact" not in results:
        return {}
    lv, cp = results["lavis"]["summary"], results["compact"]["summary"]
    ratios = {k: cp[k] / lv[k] for k in ("rank_pss", "worker_pss", "total_pss", "rank_peak_rss") if lv[k]}
    if "baseline" in results:
        b = results["baseline"]["summary"]["total_pss"]
        ratios["above_baseline"] = (cp["total_pss"] - b) / (lv["total_pss"] - b)
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4_000_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", default="lavis,compact,baseline")
    parser.add_argument("--workdir", default=None, help="where the annotation file is written (kept for reruns)")
    parser.add_argument("--results-dir", default=C.RESULTS_DIR)
    parser.add_argument("--tag", default="")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_process:
        return run_rank(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: choose from {sorted(VARIANTS)}")
    args.device = "cpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_annotations_")
    os.makedirs(workdir, exist_ok=True)
    path = annotation_file(workdir, args.pairs)
    results = {}
    for variant in variants:
        results[variant] = run_variant(variant, args, path, workdir)
        results[variant]["summary"] = summarize(results[variant])
        s = results[variant]["summary"]
        print(f"{variant}: rank PSS {s['rank_pss'] / R.MB:,.0f} MB, worker PSS {s['worker_pss'] / R.MB:,.0f} MB, "
              f"total PSS {s['total_pss'] / R.MB:,.0f} MB", flush=True)
    machine = R.machine_info("cpu")
    sizes_line = (f"{args.pairs:,} pairs ({os.path.getsize(path) / R.MB:,.0f} MB JSON list), {args.ranks} ranks x "
                  f"{args.workers} workers, gloo, fork")
    md = table(results, args)
    ratios = compact_ratios(results)
    notes = NOTES + (["compact / LAVIS: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())] if ratios else [])
    payload = dict(machine=machine, sizes_line=sizes_line, args={k: v for k, v in vars(args).items()
                                                                 if k not in ("rank_process", "variant", "file", "out")},
                   argv=argv, annotation_file_bytes=os.path.getsize(path), ratios=ratios,
                   results=list(results.values()))
    R.publish(SCRIPT, args, machine, sizes_line, md, notes, payload)
    return payload


if __name__ == "__main__":
    main()
