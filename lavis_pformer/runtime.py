"""The one place that knows where stock LAVIS 1.0.2 assumes CUDA, and what the plugin does about it.

On GPUs the plugin uses LAVIS's own path (nccl, ``torch.cuda.set_device``, ``PrefetchLoader``).
On CPU, or under ``torchrun`` without GPUs:

- ``init_distributed`` starts a gloo process group; a single process gets a 1-rank gloo group so that
  LAVIS's unconditional ``dist.barrier()`` (runner_base.py:406) and ``all_gather_with_grad`` work.
- ``RunnerPFormer`` (registered ``runner_pformer``) wraps the model in DDP whatever its device,
  without ``device_ids`` on CPU (runner_base.py:85/:92), builds loaders without the CUDA
  ``PrefetchLoader`` (:538), resolves ``output_dir`` against the working directory instead of the
  installed lavis package (:345), evaluates on the run's device (:469 passes cuda_enabled=True),
  writes checkpoints atomically (plus ``checkpoint_last.pth``, the newest epoch) and keeps
  ``<output_dir>/latest`` pointing at the newest job folder.
- ``SmoothedValue.synchronize_between_processes`` builds its tensor on "cuda" (common/logger.py:43);
  ``_synchronize_on_backend_device`` replaces it (the one unavoidable shim).
"""
import contextlib
import datetime
import functools
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lavis.common.logger as lavis_logger
import lavis.runners.runner_base as lavis_runner_base
from lavis.common.dist_utils import init_distributed_mode, setup_for_distributed
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase


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


def init_distributed(run_cfg):
    """Start torch.distributed for this run; sets run_cfg.distributed / rank / world_size / gpu.

    - torchrun + ``device: cuda`` + GPUs present: LAVIS's own init (nccl).
    - torchrun on CPU: gloo over the env:// rendezvous that torchrun provides.
    - a plain ``python train.py``: a 1-rank gloo group in memory (``distributed`` stays False: no DDP).
    """
    device = str(run_cfg.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "run.device is 'cuda' but this machine has no usable GPU; "
            "add `--options run.device=cpu` (and run.amp=False) to run on the CPU."
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
    if not dist.is_initialized() or dist.get_rank() == 0:
        job_id = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        candidate, n = job_id, 0
        while os.path.exists(os.path.join(os.path.abspath(output_dir), candidate)):
            n += 1
            candidate = f"{job_id}_{n}"
        ids = [candidate]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


class _NoPrefetch:
    """Stands in for LAVIS's PrefetchLoader on CPU: returns the DataLoader itself."""

    def __new__(cls, loader):
        return loader


@registry.register_runner("runner_pformer")
class RunnerPFormer(RunnerBase):
    """LAVIS's epoch runner, made device-agnostic (see the module docstring). Same config keys."""

    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg, task, model, datasets, job_id)
        # runner_base.py:469 calls task.evaluation(model, loader) with its default cuda_enabled=True.
        task.evaluation = functools.partial(task.evaluation, cuda_enabled=self.cuda_enabled)

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

    def create_loaders(self, *args, **kwargs):
        if self.device.type == "cuda":
            return super().create_loaders(*args, **kwargs)
        with _patched(lavis_runner_base, "PrefetchLoader", _NoPrefetch):
            return super().create_loaders(*args, **kwargs)

    def setup_output_dir(self):
        """``output_dir`` relative to the working directory (LAVIS: relative to site-packages/lavis)."""
        output_dir = os.path.join(os.path.abspath(self.config.run_cfg.output_dir), self.job_id)
        result_dir = os.path.join(output_dir, "result")
        try:
            os.makedirs(result_dir, exist_ok=True)
        except OSError as e:
            raise PermissionError(
                f"cannot create the output folder {output_dir} ({e.strerror}); "
                "set run.output_dir to a writable folder, e.g. --options run.output_dir=output/my_run"
            ) from e
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(
                f"the output folder {output_dir} is not writable; set run.output_dir to a writable folder"
            )
        registry.register_path("result_dir", result_dir)
        registry.register_path("output_dir", output_dir)
        self.result_dir, self.output_dir = Path(result_dir), Path(output_dir)
        if not dist.is_initialized() or dist.get_rank() == 0:
            _point_latest_at(output_dir)

    def _save_checkpoint(self, cur_epoch, is_best=False):
        """LAVIS's checkpoint written atomically, then the model's own exports (stage 0: ``pformer.pth``).

        LAVIS writes straight to the final name; here it writes into a scratch folder next to it and
        the file is moved into place with os.replace, so a kill mid-save never leaves a truncated
        checkpoint under the final name.
        """
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        final_dir = self.output_dir
        scratch = final_dir / ".saving"
        scratch.mkdir(exist_ok=True)
        self.output_dir = scratch
        try:
            super()._save_checkpoint(cur_epoch, is_best=is_best)
        finally:
            self.output_dir = final_dir
        for name in os.listdir(scratch):
            os.replace(scratch / name, final_dir / name)
            if not is_best:  # checkpoint_last.pth: a fixed name for the next stage (hard link, no copy)
                os.link(final_dir / name, scratch / "last")
                os.replace(scratch / "last", final_dir / "checkpoint_last.pth")
        export = getattr(self.unwrap_dist_model(self.model), "export_checkpoint", None)
        if export is not None:
            logging.info("Exported %s", export(str(final_dir)))

def _point_latest_at(run_dir):
    """``<output_dir>/latest`` -> this job's folder, so later stages can name a fixed path."""
    link = os.path.join(os.path.dirname(run_dir), "latest")
    tmp = f"{link}.{os.getpid()}"
    os.symlink(os.path.basename(run_dir), tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def _patched(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
