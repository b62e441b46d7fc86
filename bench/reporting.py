"""The machine a benchmark ran on, its tables, and the result files (``<script>_<device>[_<tag>].json`` / ``.md``)."""
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

from common import REPO, device_tag

MB = 2 ** 20


def machine_info(device):
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = dict(cpu=cpu, cpu_cores=cores, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), device=str(device), gpu=None)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes competing for the CPU
    except OSError:
        pass
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def machine_line(info):
    where = f"GPU {info['gpu']}, " if info.get("gpu") else ""
    return (f"{where}CPU {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads), "
            f"load {info.get('load_average_1min', '?')}, torch {info['torch']}, {info['date']}"
            + (f", git {info['git']}" if info.get("git") else ""))


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(s):
    """Seconds as ms with 3 significant digits."""
    ms = s * 1000
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mb(b):
    return f"{b / MB:.1f}"


def fmt_spread(stats):
    return f"{fmt_s(stats['q1'])}–{fmt_s(stats['q3'])} ({fmt_s(stats['min'])}–{fmt_s(stats['max'])})"


def result_base(script, args):
    """``<results-dir>/<script>_<device>[_<tag>]``, the path of the result files without their suffix."""
    tag = f"_{args.tag}" if getattr(args, "tag", "") else ""
    return os.path.join(args.results_dir, f"{script}_{device_tag(args.device)}{tag}")


def write_json(script, args, payload):
    """``<result_base>.json``: the payload as it is now (scripts that measure in parts write it after each)."""
    os.makedirs(args.results_dir, exist_ok=True)
    path = result_base(script, args) + ".json"
    with open(path + ".tmp", "w") as f:
        json.dump(dict(script=script, **payload), f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def write_results(script, args, payload, table, notes=()):
    """``<results-dir>/<script>_<device>.json`` (latest run) and append the table to ``.md``; returns paths."""
    base = result_base(script, args)
    write_json(script, args, payload)
    payload = dict(script=script, **payload)
    if sys.argv[0].endswith(script + ".py"):
        cmd = ("python bench/" + script + ".py " + " ".join(sys.argv[1:])).strip()
    else:
        cmd = f"{script}.main({payload.get('argv')})"
    lines = [f"## {payload['machine']['date']} — {script} ({payload['sizes_line']})", "",
             f"Machine: {machine_line(payload['machine'])}.", f"Command: `{cmd}`.", "", table, ""]
    lines += [f"- {n}" for n in notes]
    with open(base + ".md", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return base + ".json", base + ".md"


def publish(script, args, machine, sizes_line, table, notes, payload):
    """Print the table and its notes, then write the result files (``write_results``); returns their paths."""
    print(f"\n{script}: {sizes_line}\n{machine_line(machine)}\n\n{table}\n")
    for n in notes:
        print("- " + n)
    paths = write_results(script, args, payload, table, notes)
    print("wrote", *paths)
    return paths


def args_record(args):
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
