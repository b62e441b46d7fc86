"""Part 2 of the GPU check: the tiny chain through train.py / evaluate.py as a user runs it on a GPU.

For OPT and for T5 (the two chains run side by side): stage 0 -> stage 1 -> stage 2 (2 epochs) -> zero-shot VQA and
captioning, each under ``torchrun --nproc_per_node=1`` with ``run.device=cuda`` (LAVIS's nccl start) and
``run.amp=True`` (LAVIS's fp16 autocast and GradScaler), the ViT and the LLM in LAVIS's GPU precisions (ViT fp16,
OPT fp16, T5 bf16); then stage 2 again, resumed from its epoch-0 checkpoint. Recorded for every run: the command,
its exit status and time, the last logged losses (or metrics), the end of its output when it failed; for the
resume also whether its epoch-1 losses equal the uninterrupted run's and whether the epoch-0 RNG sidecar holds a
CUDA generator state. ``--dry-run``: the same runs on the CPU (``run.device=cpu``: gloo), in fp32 without autocast.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
TINY = os.path.join(REPO, "projects", "pformer", "tiny")
RUNS_PER_CHAIN = 6  # stages 0, 1, 2, VQA, captioning, the resume
LLM_PRECISION = {"opt": "fp16", "t5": "bf16"}  # LAVIS's: Blip2OPT loads OPT in fp16, Blip2T5 casts T5 to bf16


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_options(llm, dry_run, stage=None):
    """``--options`` of a run of the ``llm`` chain (``stage`` None: an evaluation): on a GPU ``run.device=cuda``,
    ``run.amp=True`` and LAVIS's GPU precisions; in a dry run the tiny configs' CPU settings (fp32, no autocast:
    CPU fp16 kernels made the chain ten times slower; tests/test_gpu_dtypes.py runs those precisions on the CPU)."""
    options = ["run.device=cpu"] if dry_run else ["run.device=cuda", f"model.llm_precision={LLM_PRECISION[llm]}"]
    if stage != 0 and not dry_run:  # stage 0 has no image encoder
        options.append("model.vit_precision=fp16")
    if stage is not None:  # a training run
        options += [f"run.amp={not dry_run}", f"run.max_epoch={2 if stage == 2 else 1}"]
    return options


def last_json_line(path):
    try:
        lines = [line for line in open(path).read().splitlines() if line.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def epoch_stats(run_dir):
    """{epoch: {key: value}} of the ``train_*`` entries of a run's log.txt (LAVIS writes one line per epoch)."""
    stats = {}
    for line in open(os.path.join(run_dir, "log.txt")).read().splitlines():
        if not line.startswith('{"train_'):  # the run's config comes first, over several lines
            continue
        entry = json.loads(line)
        if entry:
            stats[len(stats)] = {k: v for k, v in entry.items() if k.startswith("train_") and k != "train_lr"}
    return stats


class Chain:
    """The runs of one LLM's chain, in ``<out>/chain/work`` (where ``output/tiny`` holds the tiny backbones and
    world); their logs in ``<out>/chain/logs``."""

    def __init__(self, llm, out, dry_run, deadline, on_run):
        self.llm, self.out, self.dry_run, self.deadline = llm, out, dry_run, deadline
        self.workdir, self.logs = os.path.join(out, "chain", "work"), os.path.join(out, "chain", "logs")
        self.on_run = on_run  # called after every run
        self.runs = []

    def run(self, name, script, cfg, options):
        """One torchrun; returns its record (appended to ``self.runs``)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               os.path.join(REPO, script), "--cfg-path", os.path.join(TINY, cfg), "--options", *options]
        log = os.path.join(self.logs, f"{self.llm}_{name.replace(' ', '_')}.log")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        start = time.monotonic()
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
            try:
                status = proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # torchrun ends its workers on SIGTERM
                status = "timeout"
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        record = dict(name=f"{self.llm} {name}", command=" ".join(cmd[1:]), exit_status=status,
                      seconds=round(time.monotonic() - start, 1), log=os.path.relpath(log, self.out))
        lines = open(log, errors="replace").read().splitlines()
        if status != 0:
            record["output_tail"] = lines[-15:]
        teacher = [re.search(r"P-Former teacher .*, (fp32|fp16|bf16), alignment_weight", line) for line in lines]
        teacher = [match.group(1) for match in teacher if match]
        if teacher:
            record["teacher_precision"] = teacher[0]  # the default of run.device, when not set
        self.runs.append(record)
        return record

    def output_dir(self, name):
        return os.path.realpath(os.path.join(self.workdir, "output", "tiny", name, "latest"))

    def train(self, stage):
        record = self.run(f"stage {stage}", "train.py", f"pretrain_stage{stage}_{self.llm}.yaml",
                          run_options(self.llm, self.dry_run, stage))
        if record["exit_status"] == 0:
            stats = epoch_stats(self.output_dir(f"stage{stage}_{self.llm}"))
            record["final_losses"] = stats[max(stats)]
        self.on_run()
        return record["exit_status"] == 0

    def evaluate(self, kind, java):
        options = run_options(self.llm, self.dry_run) + ([] if java or kind == "vqa" else ["run.report_metric=False"])
        record = self.run(f"{kind} evaluation", "evaluate.py", f"eval_{kind}_{self.llm}.yaml", options)
        if record["exit_status"] == 0:
            record["metrics"] = last_json_line(os.path.join(self.output_dir(f"eval_{kind}_{self.llm}"), "evaluate.txt"))
            if not java and kind == "caption":
                record["note"] = "no java on this machine: captions generated, not scored (run.report_metric=False)"
        self.on_run()

    def resume(self):
        """Stage 2 again from its epoch-0 checkpoint, into its own folder; compared with the uninterrupted run."""
        first = self.output_dir(f"stage2_{self.llm}")
        options = run_options(self.llm, self.dry_run, 2) + [
            f"run.resume_ckpt_path={os.path.join(first, 'checkpoint_0.pth')}",
            f"run.output_dir=output/tiny/stage2_{self.llm}_resumed"]
        record = self.run("stage 2 resumed from epoch 0", "train.py", f"pretrain_stage2_{self.llm}.yaml", options)
        if record["exit_status"] == 0:
            self.compare_resumed(record, first)
        self.on_run()

    def compare_resumed(self, record, first):
        uninterrupted, resumed = epoch_stats(first)[1], epoch_stats(self.output_dir(f"stage2_{self.llm}_resumed"))
        record["final_losses"] = resumed[max(resumed)]
        record["uninterrupted_epoch1_losses"] = uninterrupted
        record["same_epoch1_losses"] = resumed[max(resumed)] == uninterrupted
        rng = torch.load(os.path.join(first, "checkpoint_0.rng.pth"), map_location="cpu", weights_only=True)
        record["rng_sidecar_cuda_state"] = rng["ranks"][0]["cuda"] is not None

    def all(self, java):
        """The chain's runs in order; a training run that fails ends the chain (the next one needs its output)."""
        try:
            for stage in (0, 1, 2):
                if not self.train(stage):
                    return
            self.evaluate("vqa", java)
            self.evaluate("caption", java)
            self.resume()
        except Exception:  # noqa: BLE001  (reading a run's outputs failed: recorded as a failure of the chain)
            self.runs.append(dict(name=f"{self.llm}: reading the runs' outputs", command="", exit_status="error",
                                  seconds=None, output_tail=traceback.format_exc().splitlines()[-15:]))
            self.on_run()


def run(out, dry_run, time_limit, save):
    """The part's result: {"device", "tiny_build", "runs": [...], "failed": n}; ``save(result)`` after each run."""
    device = "cpu" if dry_run else "cuda"
    start = time.monotonic()
    deadline = start + time_limit - 5  # leave time to write the results
    root = os.path.join(out, "chain")
    workdir, logs = os.path.join(root, "work"), os.path.join(root, "logs")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(logs)
    build = subprocess.run(
        [sys.executable, "-m", "lavis_pformer.tiny", "--out", os.path.join(workdir, "output", "tiny")], cwd=REPO,
        capture_output=True, text=True, timeout=time_limit, env=dict(os.environ, PYTHONPATH=REPO))
    result = dict(device=device, launcher="torchrun --nproc_per_node=1", amp=not dry_run,
                  backend="gloo" if dry_run else "nccl",
                  precisions="fp32" if dry_run else {"vit": "fp16", **LLM_PRECISION},
                  tiny_build=dict(exit_status=build.returncode, seconds=round(time.monotonic() - start, 1)), runs=[])
    if build.returncode != 0:
        result["tiny_build"]["output_tail"] = (build.stdout + build.stderr).splitlines()[-15:]
        result["failed"] = 1
        return result
    java = shutil.which("java") is not None
    lock = threading.Lock()
    chains = []

    def on_run():
        with lock:
            result["runs"] = [record for chain in chains for record in chain.runs]
            result["failed"] = sum(r["exit_status"] != 0 for r in result["runs"])
            save(result)

    chains += [Chain(llm, out, dry_run, deadline, on_run) for llm in ("opt", "t5")]
    threads = [threading.Thread(target=chain.all, args=(java,)) for chain in chains]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_run()
    result["missing_runs"] = max(0, RUNS_PER_CHAIN * len(chains) - len(result["runs"]))  # not run after a failure
    result["checkpoints"] = sorted(os.path.relpath(p, workdir) for p in glob.glob(
        os.path.join(workdir, "output", "tiny", "stage2_*", "*", "checkpoint_*.pth")))
    return result
