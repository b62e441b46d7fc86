"""The first GPU run in one command: every question a short GPU loan must answer, brought back as files.

    python bench/gpu_check.py [--out output/gpu-check]          # make gpu-check; one CUDA GPU, about 8 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check     # the same script on the CPU: tiny, gloo, few steps

Parts, each in its own process under its own time limit; a part that fails, crashes or runs out of time is
recorded as such and the next part runs:

1. ``env``: torch, CUDA, GPU name and memory, nccl, cuDNN, bf16 support, java (``gpu_check_parts.environment``);
2. ``chain``: the tiny chain (stages 0, 1, 2, VQA and caption evaluation, OPT and T5) under ``torchrun
   --nproc_per_node=1`` with nccl, ``run.device=cuda``, ``run.amp=True``, then a resume (``gpu_check_chain``);
3. ``steps``: the paper-size training steps under fp16 autocast + GradScaler and under bf16, plugin next to
   stock LAVIS (``gpu_check_parts.steps``, which runs ``bench_train_step``);
4. ``bench``: the inference and VQ benchmarks (``gpu_check_parts.benchmarks``).

Writes into ``--out``: ``gpu_check.json`` and ``gpu_check.md`` (everything, summarised), ``<part>.json`` (each part's
result, saved as it goes), ``<part>.log`` (its output), and the parts' own files (``chain/``: the runs' logs and
outputs; ``steps/``, ``bench/``: the benchmarks' result files). ``--dry-run`` runs on the CPU: tiny sizes,
``run.device=cpu`` (gloo), one repeat; it checks the script, not the GPU.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

PARTS = ("env", "chain", "steps", "bench")
# Seconds per part on one H200-class GPU: 480 s in all, the 8 minutes a GPU check may take.
LIMITS = {"env": 30, "chain": 150, "steps": 200, "bench": 100}
DRY_RUN_LIMITS = {"env": 120, "chain": 900, "steps": 600, "bench": 300}  # a loaded 2-core CPU
TITLES = {"env": "1. Environment", "chain": "2. Tiny chain through torchrun", "steps": "3. Paper-size training steps",
          "bench": "4. Inference and VQ benchmarks"}


def part_function(name):
    import gpu_check_chain
    import gpu_check_parts

    return {"env": gpu_check_parts.environment, "chain": gpu_check_chain.run, "steps": gpu_check_parts.steps,
            "bench": gpu_check_parts.benchmarks}[name]


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def run_part_here(name, out, dry_run, limit):
    """The body of a part's process: its function, saving ``<out>/<name>.json`` as it goes."""
    import common  # noqa: F401  (offline, quiet environment)

    path = os.path.join(out, f"{name}.json")
    result = part_function(name)(out, dry_run, limit, lambda partial: write_json(path, partial))
    write_json(path, result)


def run_part(name, out, dry_run, limit):
    """Run part ``name`` in a child process (its own session, so that a timeout ends its torchrun children too);
    returns {"status", "exit_status", "seconds", "result"}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", out, "--limit", str(limit)]
    cmd += ["--dry-run"] if dry_run else []
    result_path = os.path.join(out, f"{name}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    start = time.monotonic()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_status = child.wait(timeout=limit)
            status = "ok" if exit_status == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, exit_status = "timeout", None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(child.pid, sig)
                    child.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = round(time.monotonic() - start, 1)
    result = json.load(open(result_path)) if os.path.exists(result_path) else None
    if status == "ok" and (result is None or failures(name, result)):
        status = "failed"
    entry = dict(status=status, exit_status=exit_status, seconds=seconds, limit_s=limit, result=result)
    if status != "ok":
        entry["log_tail"] = open(os.path.join(out, f"{name}.log"), errors="replace").read().splitlines()[-20:]
    return entry


def failures(name, result):
    """How many things inside a finished part failed (a part can exit 0 with failed runs or measurements)."""
    if name == "env":
        return int("error" in result)
    if name == "chain":
        return result.get("failed", 1) + result.get("missing_runs", 0)
    if name == "steps":
        return sum("error" in row for row in result.get("rows", [])) + (not result.get("complete"))
    return sum("error" in entry for entry in result.values())


def main(argv=None):
    import gpu_check_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="output/gpu-check", help="folder of the results (default output/gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny sizes, gloo, one repeat")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)  # a part's own process
    parser.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.part:
        return run_part_here(args.part, out, args.dry_run, args.limit)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts: a comma list of {', '.join(PARTS)}")
    limits = DRY_RUN_LIMITS if args.dry_run else LIMITS
    start = time.monotonic()
    summary = dict(dry_run=args.dry_run, out=out, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), parts={})
    for name in parts:
        print(f"[gpu-check] {TITLES[name]} (limit {limits[name]} s) ...", flush=True)
        summary["parts"][name] = entry = run_part(name, out, args.dry_run, limits[name])
        print(f"[gpu-check] {TITLES[name]}: {entry['status']} in {entry['seconds']} s", flush=True)
        summary["total_seconds"] = round(time.monotonic() - start, 1)
        write_json(os.path.join(out, "gpu_check.json"), summary)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(gpu_check_report.markdown(summary))
    total = summary["total_seconds"]
    print(f"[gpu-check] total {int(total // 60)} min {total % 60:.0f} s; "
          f"results in {out}/gpu_check.md and gpu_check.json", flush=True)
    return summary


if __name__ == "__main__":
    main()
