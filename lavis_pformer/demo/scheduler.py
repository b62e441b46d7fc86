"""A small scheduler of the demo's ``train.py`` / ``evaluate.py`` subprocesses: a dependency DAG of jobs, run a
few at a time, the critical path first."""
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("stage0", "stage1", "stage2", "eval_vqa", "eval_caption")
COST = {"stage0": 3, "stage1": 2, "stage2": 3, "eval_vqa": 1, "eval_caption": 1}  # for the run order only


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Job:
    """One ``train.py`` / ``evaluate.py`` run of a written config, after the jobs named in ``after``."""

    def __init__(self, name, script, cfg_path, log_path, output_dir, after=()):
        self.name, self.script, self.cfg_path, self.log_path = name, script, cfg_path, log_path
        self.output_dir, self.after = output_dir, tuple(after)
        self.kind = next(k for k in STAGES if name.endswith(k))


def _priority(jobs):
    """Cost of the longest chain of jobs that starts at each job (the critical path goes first)."""
    after = {j.name: [k for k in jobs if j.name in k.after] for j in jobs}
    memo = {}

    def chain(job):
        if job.name not in memo:
            memo[job.name] = COST[job.kind] + max((chain(k) for k in after[job.name]), default=0)
        return memo[job.name]

    return {j.name: chain(j) for j in jobs}


def run_jobs(jobs, parallel=1, threads=None):
    """Run ``jobs`` (a dependency DAG), ``parallel`` at a time, each one's output in its log file.

    Each subprocess runs with ``threads`` torch threads (OMP_NUM_THREADS), so its results do not depend on
    the machine's core count. Returns {name: seconds}; the first failure stops the rest.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    priority = _priority(jobs)
    pending = sorted(jobs, key=lambda j: -priority[j.name])
    running, done, times = {}, set(), {}
    try:
        while pending or running:
            for job in [j for j in pending if set(j.after) <= done][: max(0, parallel - len(running))]:
                pending.remove(job)
                out = open(job.log_path, "w")
                proc = subprocess.Popen([sys.executable, os.path.join(REPO, job.script), "--cfg-path", job.cfg_path],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[job.name] = (job, proc, out, time.time())
                log(f"  {job.name} started")
            time.sleep(0.2)
            for name, (job, proc, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del running[name]
                if proc.returncode != 0:
                    tail = open(job.log_path).read()[-3000:]
                    raise RuntimeError(f"{job.script} {job.cfg_path} failed ({proc.returncode}); log {job.log_path}:"
                                       f"\n{tail}")
                times[name] = round(time.time() - t0, 1)
                done.add(name)
                log(f"  {name} done in {times[name]:.1f}s -> {os.path.realpath(os.path.join(job.output_dir, 'latest'))}")
    finally:
        for job, proc, out, _ in running.values():
            proc.kill()
            out.close()
    return times
