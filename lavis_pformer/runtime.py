"""The one place that knows where stock LAVIS 1.0.2 assumes CUDA, and what the plugin does about it.

On GPUs the plugin uses LAVIS's own path (nccl, ``torch.cuda.set_device``, ``PrefetchLoader``).
On CPU, or under ``torchrun`` without GPUs:

- ``init_distributed`` starts a gloo process group; a single process gets a 1-rank gloo group so that
  LAVIS's unconditional ``dist.barrier()`` (runner_base.py:406) and ``all_gather_with_grad`` work.
- ``RunnerPFormer`` (registered ``runner_pformer``) wraps the model in DDP whatever its device,
  without ``device_ids`` on CPU (runner_base.py:85/:92), builds loaders without the CUDA
  ``PrefetchLoader`` (:538) and without ``IterLoader``'s 2-s pause per epoch when there are no loader
  workers (dataloader_utils.py:152), resolves ``output_dir`` against the working directory instead of the
  installed lavis package (:345), evaluates on the run's device (:469 passes cuda_enabled=True),
  writes checkpoints atomically (plus ``checkpoint_last.pth``, the newest epoch) and keeps
  ``<output_dir>/latest`` pointing at the newest job folder.
- Resume (``run.resume_ckpt_path``, LAVIS's ``_load_checkpoint``): next to each per-epoch checkpoint the
  runner writes ``checkpoint_N.rng.pth``, the torch / CUDA / numpy / python RNG states of every rank at
  the end of epoch N (LAVIS saves none). A resumed run restores them and restarts the training loader at
  the resumed epoch (LAVIS's ``IterLoader`` would count epochs from 0 again), so it repeats the data
  order, masking and dropout of an uninterrupted run: see docs/reliability.md for what is bit-exact.
- ``SmoothedValue.synchronize_between_processes`` builds its tensor on "cuda" (common/logger.py:43);
  ``_synchronize_on_backend_device`` replaces it (the one unavoidable shim).
"""
import contextlib
import datetime
import functools
import logging
import os
import shutil
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import IterableDataset

import lavis.common.logger as lavis_logger
import lavis.runners.runner_base as lavis_runner_base
from lavis.common.dist_utils import get_world_size, init_distributed_mode, is_main_process, setup_for_distributed
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.datasets.datasets.dataloader_utils import IterLoader
from lavis.runners.runner_base import RunnerBase

from lavis_pformer.errors import ConfigError, OutputFolderError, ResumeError, SetupError
from lavis_pformer.resume import RNG_SUFFIX, check_resume_file, gather_rng_states, read_rng_states, set_rng_states

def _collective_device():
    """Device for collective tensors: CUDA for nccl, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _synchronize_on_backend_device(self):
    """Replacement for lavis.common.logger.SmoothedValue.synchronize_between_processes.

    Same contract (sum count/total over ranks; the deque is not synchronised) but the tensor lives
    on the process group's device, so it works with gloo on CPU as well as nccl on GPU.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    stats = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
    dist.barrier()
    dist.all_reduce(stats)
    self.count, self.total = int(stats[0].item()), stats[1].item()


lavis_logger.SmoothedValue.synchronize_between_processes = _synchronize_on_backend_device


_group_started_here = False  # whether init_distributed started the process group (end_distributed ends it)


def init_distributed(run_cfg):
    """Start torch.distributed for this run; sets run_cfg.distributed / rank / world_size / gpu.

    - torchrun + ``device: cuda`` + GPUs present: LAVIS's own init (nccl).
    - torchrun on CPU: gloo over the env:// rendezvous that torchrun provides.
    - a plain ``python train.py``: a 1-rank gloo group in memory (``distributed`` stays False: no DDP).

    A 1-rank group that already exists (the caller's) is used as it is, and the caller ends it.
    """
    global _group_started_here
    existed = dist.is_initialized()
    try:
        _start_distributed(run_cfg)
    finally:
        _group_started_here = not existed and dist.is_initialized()


def end_distributed(wait_for_others=True):
    """Leave the process group that ``init_distributed`` started; train.py and evaluate.py call it on every rank
    before they exit, after a user error too.

    LAVIS never destroys its process group, so each rank exited with the group alive: the backend's worker
    threads could then still hold the last references to the tensors of the last collectives, and when such a
    thread dropped them while the interpreter was already finalizing, taking the GIL killed the process with
    SIGABRT, after a run that had succeeded (a PyTorch behaviour described in pytorch/pytorch#179291, whose atexit
    fix was not merged; rare: the thread has to drop them at that very moment, more likely on a loaded machine).
    ``destroy_process_group`` joins those threads while the process is whole. Every rank first waits for the
    others (``wait_for_others``: after a finished run; never after an error, when some rank may not come), so that
    no rank takes the group down while another still uses it.
    """
    global _group_started_here
    if not (_group_started_here and dist.is_initialized()):
        return
    _group_started_here = False
    try:
        if wait_for_others and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _start_distributed(run_cfg):
    device = str(run_cfg.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(
            "run.device is 'cuda' but this machine has no usable GPU; "
            "add `--options run.device=cpu` to run on the CPU (with run.amp: True the training steps then run "
            "under CPU autocast; fp32 backbones: model.vit_precision=fp32 model.llm_precision=fp32 run.amp=False)."
        )
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and device.startswith("cuda"):
        run_cfg.dist_url = run_cfg.get("dist_url", "env://")
        init_distributed_mode(run_cfg)
        return
    if launched:
        run_cfg.rank = int(os.environ["RANK"])
        run_cfg.world_size = int(os.environ["WORLD_SIZE"])
        run_cfg.gpu = None
        run_cfg.distributed = True
        dist.init_process_group(
            "gloo", init_method="env://", rank=run_cfg.rank, world_size=run_cfg.world_size,
            timeout=datetime.timedelta(minutes=int(run_cfg.get("dist_timeout_min", 30))),
        )
        # As LAVIS's nccl start: no rank goes on before every rank has connected (a rank that stops at once, e.g.
        # on an input error, would otherwise close its connections while another is still setting up its own).
        dist.barrier()
        setup_for_distributed(run_cfg.rank == 0)
    else:
        run_cfg.distributed = False
        run_cfg.rank, run_cfg.world_size, run_cfg.gpu = 0, 1, None
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if device.startswith("cuda"):
            torch.cuda.set_device(0)


def make_job_id(output_dir):
    """A job id chosen by rank 0 and shared with every rank: ``YYYYmmddHHMMSS`` (+ ``_N`` if taken)."""
    ids = [None]
    if is_main_process():
        job_id = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        candidate, n = job_id, 0
        while os.path.exists(os.path.join(os.path.abspath(output_dir), candidate)):
            n += 1
            candidate = f"{job_id}_{n}"
        ids = [candidate]
    if get_world_size() > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def make_output_dir(path):
    """``os.makedirs(path)``; a PermissionError that names the problem and the fix if it is not a writable folder.

    ``cli.build`` calls it for ``run.output_dir`` before anything is built, so that a bad output folder
    fails in seconds, not after the LLM has been loaded.
    """
    path = os.path.abspath(str(path))
    fix = "set run.output_dir to a writable folder, e.g. --options run.output_dir=output/my_run"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        blocker = path
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        why = f"{blocker} is a file, not a folder" if os.path.exists(blocker) and not os.path.isdir(blocker) \
            else e.strerror
        raise OutputFolderError(f"cannot create the output folder {path} ({why}); {fix}") from e
    if not os.access(path, os.W_OK):
        raise OutputFolderError(f"the output folder {path} is not writable; {fix}")


class _NoPrefetch:
    """Stands in for LAVIS's PrefetchLoader on CPU: returns the DataLoader itself."""

    def __new__(cls, loader):
        return loader


def _start_epoch(loader, epoch):
    """Point LAVIS's ``IterLoader`` (dataloader_utils.py: ``_epoch``, ``iter_loader``) at epoch ``epoch``, as its
    own epoch change does: the distributed sampler's epoch, then a new iterator."""
    loader._epoch = epoch
    sampler = getattr(loader._dataloader, "sampler", None)
    if loader._use_distributed and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    loader.iter_loader = iter(loader._dataloader)


class NoPauseIterLoader(IterLoader):
    """LAVIS's ``IterLoader`` without its 2-second pause at each epoch change when the loader has no worker
    processes (the pause guards worker start-up; with ``num_workers: 0`` there is none, and tiny multi-epoch
    runs spent much of their time asleep)."""

    def __next__(self):
        try:
            return next(self.iter_loader)
        except StopIteration:
            if self._dataloader.num_workers > 0:  # a PrefetchLoader forwards the attribute to its DataLoader
                time.sleep(2)  # LAVIS's pause between epochs, against deadlocks of worker processes
            self.start_epoch(self._epoch + 1)
            return next(self.iter_loader)

    def start_epoch(self, epoch):
        _start_epoch(self, epoch)


@registry.register_runner("runner_pformer")
class RunnerPFormer(RunnerBase):
    """LAVIS's epoch runner, made device-agnostic (see the module docstring). Same config keys."""

    trains_on_streams = False  # LAVIS's epoch loop needs len() of the training loader

    def __init__(self, cfg, task, model, datasets, job_id):
        if not self.trains_on_streams:
            for name, splits in (datasets or {}).items():
                if isinstance(splits.get("train"), IterableDataset):
                    raise ConfigError(
                        f"datasets.{name} streams its training data without end (no epoch length), which "
                        f"{cfg.run_cfg.get('runner', 'runner_pformer')} cannot train: set run.runner: runner_iter_pformer "
                        "with run.max_iters and run.iters_per_inner_epoch (docs/data.md)")
        super().__init__(cfg, task, model, datasets, job_id)
        # runner_base.py:469 calls task.evaluation(model, loader) with its default cuda_enabled=True.
        task.evaluation = functools.partial(task.evaluation, cuda_enabled=self.cuda_enabled)
        # run.amp on the CPU: LAVIS's CUDA autocast does nothing there; the plugin's tasks use CPU autocast.
        if self.config.run_cfg.get("amp", False) and self.device.type == "cpu":
            if hasattr(task, "cpu_amp"):
                task.cpu_amp = True
                logging.info("run.amp on the CPU: training steps run under CPU autocast (fp16)")
            else:
                logging.warning("run.amp has no effect on the CPU with the task %s", type(task).__name__)

    @property
    def model(self):
        """The model on the run's device, wrapped in DDP when distributed (no device_ids on CPU)."""
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(
                    self._model, device_ids=device_ids,
                    find_unused_parameters=bool(self.config.run_cfg.get("find_unused_parameters", False)),
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    iter_loader_class = NoPauseIterLoader  # the class that wraps the training loader (LAVIS: IterLoader)

    def create_loaders(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(lavis_runner_base, "IterLoader", self.iter_loader_class))
            if self.device.type != "cuda":
                stack.enter_context(mock.patch.object(lavis_runner_base, "PrefetchLoader", _NoPrefetch))
            return super().create_loaders(*args, **kwargs)

    def setup_output_dir(self):
        """``output_dir`` relative to the working directory (LAVIS: relative to site-packages/lavis)."""
        output_dir = os.path.join(os.path.abspath(self.config.run_cfg.output_dir), self.job_id)
        result_dir = os.path.join(output_dir, "result")
        make_output_dir(result_dir)
        registry.register_path("result_dir", result_dir)
        registry.register_path("output_dir", output_dir)
        self.result_dir, self.output_dir = Path(result_dir), Path(output_dir)
        if is_main_process():
            _point_latest_at(output_dir)

    def _save_checkpoint(self, cur_epoch, is_best=False):
        """LAVIS's checkpoint written atomically, then the model's own exports (stage 0: ``pformer.pth``).

        LAVIS writes straight to the final name; here it writes into a scratch folder next to it and
        the file is moved into place with os.replace, so a kill or an error mid-save never leaves a
        truncated checkpoint under the final name nor touches the previous one. Per-epoch saves (every
        rank calls them; LAVIS saves only on rank 0) also write ``checkpoint_N.rng.pth``, the RNG states
        of all ranks, moved into place before the checkpoint.
        """
        rng = None if is_best else gather_rng_states(cur_epoch)  # collective: every rank is here
        if not is_main_process():
            return
        final_dir = self.output_dir
        name = "checkpoint_{}.pth".format("best" if is_best else cur_epoch)
        scratch = final_dir / ".saving"
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted save never reach a final name
        scratch.mkdir()
        self.output_dir = scratch
        try:
            self._write_checkpoint(cur_epoch, is_best=is_best)
            if rng is not None:
                torch.save(rng, scratch / (name[: -len(".pth")] + RNG_SUFFIX))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            self.output_dir = final_dir
        for written in sorted(os.listdir(scratch), key=lambda n: n == name):  # the checkpoint last
            os.replace(scratch / written, final_dir / written)
        if not is_best:  # checkpoint_last.pth: a fixed name for the next stage (hard link, no copy)
            os.link(final_dir / name, scratch / "last")
            os.replace(scratch / "last", final_dir / "checkpoint_last.pth")
        export = getattr(self.unwrap_dist_model(self.model), "export_checkpoint", None)
        if export is not None:
            logging.info("Exported %s", export(str(final_dir)))

    def _write_checkpoint(self, cur_epoch, is_best=False):
        """Write the checkpoint file into ``self.output_dir`` (here LAVIS's RunnerBase._save_checkpoint)."""
        RunnerBase._save_checkpoint(self, cur_epoch, is_best=is_best)

    def _load_checkpoint(self, url_or_filename):
        """LAVIS's resume (model strict, optimizer, scaler, start epoch) with clear errors, then the RNG
        states of ``checkpoint_N.rng.pth`` for this rank, applied when the first resumed epoch starts."""
        if not is_url(url_or_filename):
            check_resume_file(url_or_filename)
        try:
            super()._load_checkpoint(url_or_filename)
        except (RuntimeError, KeyError, ValueError) as e:  # strict model load, optimizer groups, missing entries
            raise ResumeError(
                f"run.resume_ckpt_path: cannot resume from {url_or_filename} ({type(e).__name__}: {e}). Resume "
                "with the checkpoint_last.pth of a run of this same model and config."
            ) from e
        self._resume_epoch = self.start_epoch
        self._resume_rng = None
        if not is_url(url_or_filename):
            self._resume_rng = read_rng_states(url_or_filename, self.start_epoch - 1)
        logging.info(
            "Resuming at epoch %d from %s (model, optimizer%s, lr schedule position; RNG states %s)",
            self.start_epoch, url_or_filename, ", grad scaler" if self.scaler else "",
            "restored" if self._resume_rng is not None else "NOT restored",
        )

    def train_epoch(self, epoch):
        if getattr(self, "_resume_epoch", None) == epoch:
            self._resume_epoch = None
            self._restart_train_loader(epoch, self._resume_rng)
        return super().train_epoch(epoch)

    def _restart_train_loader(self, epoch, rng_state):
        """First resumed epoch: RNG states as at the end of the previous epoch, then the training loader
        starts epoch ``epoch`` as LAVIS's IterLoader does at an epoch change (sampler epoch, new iterator).
        """
        loader = self.train_loader  # built now if needed, before the RNG states are restored
        if rng_state is not None:
            set_rng_states(rng_state)
        if not isinstance(loader, IterLoader):
            logging.warning("resume: the training loader is a %s, not an IterLoader: the data order of the "
                            "resumed epochs is not aligned with an uninterrupted run", type(loader).__name__)
            return
        _start_epoch(loader, epoch)


def _point_latest_at(run_dir):
    """``<output_dir>/latest`` -> this job's folder, so later stages can name a fixed path."""
    link = os.path.join(os.path.dirname(run_dir), "latest")
    tmp = f"{link}.{os.getpid()}"
    os.symlink(os.path.basename(run_dir), tmp)
    os.replace(tmp, link)
