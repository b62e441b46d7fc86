"""Parts 1, 3 and 4 of the GPU check (part 2, the tiny chain, is ``gpu_check_chain``).

Each part is ``run(out, dry_run, time_limit, save)``: it returns its result (a dict) and calls ``save(result)``
whenever a piece of it is measured, so that what is done survives a crash or the part's time limit.

1. ``environment``: torch, CUDA, the GPU's name and memory, nccl, cuDNN, bf16 support, java, the git revision.
3. ``steps``: ``bench_train_step`` at the paper's sizes (stage 1, stage 2 OPT-2.7B, stage 2 Flan-T5-XL; random
   weights, full depth) under fp16 autocast + GradScaler and under bf16, the plugin next to stock LAVIS in one
   process; the P-Former teacher compared in fp16 / fp32 / bf16.
4. ``benchmarks``: ``bench_inference`` and ``bench_vq`` with their GPU defaults.
"""
import importlib.metadata
import os
import platform
import shutil
import subprocess

import torch

from common import REPO

# bench_train_step at the paper's sizes on one GPU (the paper's per-GPU batch), and its CPU twin for --dry-run.
STEPS_GPU = ["--device", "cuda", "--size", "paper", "--stages", "1,2,2t5", "--precisions", "fp16,bf16",
             "--teacher-precisions", "fp16,fp32,bf16", "--batch", "128", "--repeats", "5", "--warmup", "2"]
TINY_CPU = ["--device", "cpu", "--size", "tiny", "--repeats", "1", "--warmup", "0", "--vit-depth", "1",
            "--image-size", "32", "--num-query-token", "4", "--threads", "1"]
STEPS_CPU = TINY_CPU + ["--stages", "1,2,2t5", "--precisions", "fp16,bf16", "--teacher-precisions", "fp32,bf16",
                        "--batch", "2", "--max-txt-len", "16"]
INFERENCE = {False: ["--device", "cuda", "--repeats", "5", "--warmup", "1"],
             True: TINY_CPU + ["--batch", "2", "--num-beams", "2", "--caption-max-len", "4", "--vqa-max-len", "3",
                               "--max-txt-len", "32"]}
VQ = {False: ["--device", "cuda", "--repeats", "5", "--warmup", "1"],
      True: ["--device", "cpu", "--vocab", "100,500", "--hidden", "16", "--tokens", "8", "--chunk-size", "64",
             "--repeats", "1", "--warmup", "0", "--threads", "1"]}


def _command(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version():
    version = torch.cuda.nccl.version()  # a tuple (major, minor, patch); an int in older torch
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment(out, dry_run, time_limit, save):
    cuda = torch.cuda.is_available()
    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                transformers=_version("transformers"), lavis=_version("salesforce-lavis"),
                cuda_available=cuda, gpu_count=torch.cuda.device_count() if cuda else 0,
                nccl=_nccl_version() if cuda else None,
                cudnn=torch.backends.cudnn.version() if cuda else None, java=shutil.which("java") is not None,
                git=_command(["git", "describe", "--always", "--dirty"]),
                nvidia_smi=_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    elif not dry_run:
        info["error"] = "no CUDA device: torch.cuda.is_available() is False"
    save(info)
    return info


def _steps_summary(payload):
    """One row per (stage, step precision) of bench_train_step's results, and its teacher comparisons."""
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append(dict(stage=r["stage"], precision=r["precision"], error=r["error"]))
            continue
        rows.append(dict(
            stage=r["stage"], precision=r["precision"], llm_precision=r["llm_precision"],
            teacher_precision=r["teacher_precision"], time_ratio=r["time_ratio"]["ratio"],
            paired_min=r["time_ratio"]["paired_min"], paired_max=r["time_ratio"]["paired_max"],
            step_peak_ratio=r["step_peak_ratio"], footprint_ratio=r["footprint_ratio"],
            step_s={k: r[k]["step"]["median"] for k in ("ours", "stock")},
            samples_per_s={k: r[k]["samples_per_s"] for k in ("ours", "stock")},
            step_peak_bytes={k: r[k]["step_peak_bytes"] for k in ("ours", "stock")},
            steps={k: r[k]["health"]["steps"] for k in ("ours", "stock")},
            nonfinite_losses={k: r[k]["health"]["nonfinite_losses"] for k in ("ours", "stock")},
            skipped_steps={k: r[k]["health"]["skipped_steps"] for k in ("ours", "stock")},
            grad_scale={k: r[k]["health"]["grad_scale"] for k in ("ours", "stock")},
            adamw_state_empty={k: r[k]["health"]["adamw_state_empty"] for k in ("ours", "stock")},
            teacher_share_of_stock_step=r["teacher_share_of_stock_step"]["median"], stock_note=r["stock_note"],
            teacher_precisions=r.get("teacher_precisions")))
    return dict(complete=payload.get("complete", False), rows=rows)


def steps(out, dry_run, time_limit, save):
    import bench_train_step  # here, not at the top: the environment part imports only torch

    argv = (STEPS_CPU if dry_run else STEPS_GPU) + ["--results-dir", os.path.join(out, "steps"), "--keep-going"]
    save(dict(argv=argv, rows=[]))
    payload = bench_train_step.main(argv, on_result=lambda p: save(dict(argv=argv, **_steps_summary(p))))
    result = dict(argv=argv, **_steps_summary(payload), sizes_line=payload["sizes_line"])
    save(result)
    return result


def benchmarks(out, dry_run, time_limit, save):
    import bench_inference
    import bench_vq

    result = {}
    for name, script, argv in (("inference", bench_inference, INFERENCE[dry_run]), ("vq", bench_vq, VQ[dry_run])):
        argv = argv + ["--results-dir", os.path.join(out, "bench")]
        try:
            payload = script.main(argv)
        except (Exception, SystemExit) as e:  # noqa: BLE001  (one failing benchmark must not cost the other)
            result[name] = dict(argv=argv, error=f"{type(e).__name__}: {e}")
            save(result)
            continue
        if name == "inference":
            result[name] = dict(argv=argv, pformer_free=payload["pformer_free"], **{
                task: dict(time_ratio=r["time_ratio"]["ratio"], peak_ratio=r["peak_ratio"],
                           same_outputs=r["same_outputs"]) for task, r in payload["results"].items()})
        else:
            result[name] = dict(argv=argv, rows=[dict(vocab=r["vocab"], time_ratio=r["time_ratio"]["ratio"],
                                                      peak_ratio=r["peak_ratio"],
                                                      same_rows_fraction=r["same_rows_fraction"])
                                                 for r in payload["results"]])
        save(result)
    return result
