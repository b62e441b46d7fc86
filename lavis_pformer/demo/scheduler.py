"""A small scheduler of the demo's subprocesses (``train.py`` / ``evaluate.py`` runs, backbone builds): a
dependency DAG of jobs, run a few at a time, the critical path first."""
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Relative cost of the demo's run kinds (for the run order only), by the suffix of the job's name.
COST = {"stage0": 3, "stage1": 2, "stage2": 3, "eval_vqa": 1, "eval_caption": 1}


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Job:
    """``python <args>`` (from the repository root), after the jobs named in ``after``; its output goes to
    ``log_path``. ``cost`` orders the runs (the longest chain of costs first); by default it is the cost of the
    run kind the name ends with (``COST``)."""

    def __init__(self, name, args, log_path, output_dir=None, after=(), cost=None):
        self.name, self.args, self.log_path, self.output_dir = name, list(args), log_path, output_dir
        self.after = tuple(after)
        self.cost = cost if cost is not None else next(c for kind, c in COST.items() if name.endswith(kind))

    @property
    def command(self):
        return " ".join(["python"] + self.args)

    def fingerprint(self):
        """sha256 of the command and of the files it names (its config): what a finished run is reused by."""
        h = hashlib.sha256(self.command.encode())
        for arg in self.args:
            if os.path.isfile(arg):
                with open(arg, "rb") as f:
                    h.update(f.read())
        return h.hexdigest()

    @property
    def done_marker(self):
        return self.log_path + ".done"

    def finished_before(self):
        """Seconds of an earlier run of the same fingerprint that exited 0, or None."""
        try:
            with open(self.done_marker) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return None
        return marker["seconds"] if marker.get("fingerprint") == self.fingerprint() else None


def _priority(jobs):
    """Cost of the longest chain of jobs that starts at each job (the critical path goes first)."""
    after = {j.name: [k for k in jobs if j.name in k.after] for j in jobs}
    memo = {}

    def chain(job):
        if job.name not in memo:
            memo[job.name] = job.cost + max((chain(k) for k in after[job.name]), default=0)
        return memo[job.name]

    return {j.name: chain(j) for j in jobs}


class JobFailed(RuntimeError):
    """A job exited with a non-zero status."""


def _failure(job, returncode):
    tail = open(job.log_path, errors="replace").read()[-3000:]
    return f"{job.command} failed ({returncode}); log {job.log_path}:\n{tail}"


def run_jobs(jobs, parallel=1, threads=None, keep_going=False, reuse=False):
    """Run ``jobs`` (a dependency DAG), ``parallel`` at a time, each one's output in its log file.

    Each subprocess runs with ``threads`` torch threads (OMP_NUM_THREADS), so its results do not depend on
    the machine's core count. Returns {name: seconds}. The first failure stops the rest (``JobFailed``), unless
    ``keep_going``: then the jobs that need a failed one are skipped, the others run, and the failures are in
    the result under ``"failed"`` ({name: message}) and ``"skipped"`` ([names]). With ``reuse``, a job that
    finished before with the same command and config (``Job.fingerprint``) is not run again (its earlier time
    counts).
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    priority = _priority(jobs)
    pending = sorted(jobs, key=lambda j: -priority[j.name])
    running, done, times, failed, skipped = {}, set(), {}, {}, []
    if reuse:
        for job in list(pending):
            seconds = job.finished_before()
            if seconds is not None:
                pending.remove(job)
                done.add(job.name)
                times[job.name] = seconds
                log(f"  {job.name} reused (finished before with the same config)")
    try:
        while pending or running:
            for job in [j for j in pending if set(j.after) & (set(failed) | set(skipped))]:
                pending.remove(job)
                skipped.append(job.name)
                log(f"  {job.name} skipped (it needs a failed run)")
            for job in [j for j in pending if set(j.after) <= done][: max(0, parallel - len(running))]:
                pending.remove(job)
                out = open(job.log_path, "w")
                proc = subprocess.Popen([sys.executable] + job.args, cwd=REPO, env=env, stdout=out,
                                        stderr=subprocess.STDOUT)
                running[job.name] = (job, proc, out, time.time())
                log(f"  {job.name} started")
            time.sleep(0.2)
            for name, (job, proc, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del running[name]
                if proc.returncode != 0:
                    if not keep_going:
                        raise JobFailed(_failure(job, proc.returncode))
                    failed[name] = _failure(job, proc.returncode)
                    log(f"  {name} FAILED ({proc.returncode}); log {job.log_path}")
                    continue
                times[name] = round(time.time() - t0, 1)
                done.add(name)
                with open(job.done_marker, "w") as f:
                    json.dump({"fingerprint": job.fingerprint(), "seconds": times[name]}, f)
                where = os.path.realpath(os.path.join(job.output_dir, "latest")) if job.output_dir else job.log_path
                log(f"  {name} done in {times[name]:.1f}s -> {where}")
    finally:
        for job, proc, out, _ in running.values():
            proc.kill()
            out.close()
    if keep_going:
        times.update(failed=failed, skipped=skipped)
    return times
