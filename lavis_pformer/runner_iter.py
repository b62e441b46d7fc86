"""``runner_iter_pformer``: LAVIS's iteration-based schedule (``RunnerIter``) with the fixes of ``runner_pformer``
and resume inside a data epoch.

LAVIS's ``runner_iter`` trains ``run.max_iters`` iterations in inner epochs of ``run.iters_per_inner_epoch``: after
each inner epoch it validates, steps the cosine schedule (one cosine step per inner epoch) and saves a checkpoint.
At 4M pairs a data epoch is hours long, so that is the schedule for long runs. This runner is LAVIS's
``RunnerIter`` (its ``train`` loop, its lr schedule, its loaders) plus:

- everything ``runner_pformer`` does on CPUs and under torchrun (DDP without device_ids on CPU, no CUDA prefetch
  loader, gloo-safe logging, output folder relative to the working directory, evaluation on the run's device,
  ``run.amp`` as CPU autocast on a CPU, atomic checkpoints with ``checkpoint_last.pth`` and the RNG sidecar);
- checkpoints hold what ``runner_base`` saves (the trainable tensors; LAVIS's RunnerIter saves every tensor of the
  model, the frozen ViT included) under LAVIS RunnerIter's keys (``iters``), written every
  ``iters_per_inner_epoch`` iterations as ``checkpoint_<iters>.pth`` (with validation splits too, where LAVIS
  writes only ``checkpoint_best.pth``);
- resume (``run.resume_ckpt_path``) continues at iteration ``iters`` (LAVIS restarts at ``iters + 1``, which
  shifts every later checkpoint name) **at the same place of the same data epoch**: the training sampler
  shuffles by ``run.seed`` and the data epoch (on one process too, where LAVIS's RandomSampler draws from the
  global RNG), the loader knows its data epoch and how many batches it has given in it, and a resumed run
  skips the batches already trained on in the sampler (no image is read for them). With the RNG sidecar the
  resumed run repeats the uninterrupted one exactly (data order, dropout, masking);
- the data loader of the DataLoader workers is seeded per (seed, rank, data epoch), so that creating it never
  draws from the global RNG (the resumed run creates it at another moment than the uninterrupted one).
  Random augmentations inside worker processes (``num_workers > 0``) still differ after a resume: a worker's
  random stream depends on the batches it processed before;
- LAVIS's ``IterLoader`` pauses 2 s at each data epoch change (against worker deadlocks); the loader here
  pauses only when it has worker processes.

What resuming needs: the same dataset, batch size and number of processes (the loader's batches per data epoch
are recorded in the checkpoint; if they differ, the run continues with a warning that the data order is not
aligned). Only checkpoints written at the end of an inner epoch exist: a run killed inside an inner epoch
repeats its iterations since the last checkpoint (choose ``iters_per_inner_epoch`` accordingly).
"""
import logging
import os
import zlib
from unittest import mock

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import lavis.runners.runner_base as lavis_runner_base
from lavis.common.dist_utils import get_rank, get_world_size
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.runners.runner_iter import RunnerIter

from lavis_pformer.errors import ConfigError, ResumeError
from lavis_pformer.resume import check_resume_file, read_rng_states, set_rng_states
from lavis_pformer.runtime import RunnerPFormer, NoPauseIterLoader

ITERS_FORMAT = "lavis_pformer/iter-checkpoint-v1"


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (this rank's share, shuffled by ``seed`` + the epoch set with ``set_epoch``) whose next
    pass can start after its first ``start`` indices (a resumed data epoch)."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableIterLoader(NoPauseIterLoader):
    """LAVIS's ``IterLoader`` (endless batches, one data epoch after another) that knows its position: ``epoch`` and
    ``batches_in_epoch``; ``seek(n)`` puts it where it is after giving ``n`` batches.

    Unlike LAVIS's, it sets the sampler's epoch on one process too.
    """

    def __init__(self, dataloader, use_distributed=False):
        # Not IterLoader.__init__, which creates the first iterator before the position is set.
        self._dataloader = dataloader
        self._use_distributed = use_distributed
        self.start_epoch(0)

    def start_epoch(self, epoch, skip_batches=0):
        self._epoch = epoch
        self.batches_in_epoch = skip_batches
        sampler = self._dataloader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if isinstance(sampler, ResumableSampler):
            sampler.start = skip_batches * self._dataloader.batch_size
            if self._dataloader.generator is not None:  # the workers' seeds for this epoch, not from the global RNG
                self._dataloader.generator.manual_seed(zlib.crc32(f"{sampler.seed}/{sampler.rank}/{epoch}".encode()))
        elif skip_batches:
            raise ValueError("only a loader over a ResumableSampler can start inside an epoch")
        self.iter_loader = iter(self._dataloader)

    def __next__(self):
        data = super().__next__()
        self.batches_in_epoch += 1
        return data

    def seek(self, batches_done):
        """Continue as a loader that has given ``batches_done`` batches since data epoch 0 began."""
        per_epoch = len(self._dataloader)
        self.start_epoch(batches_done // per_epoch, batches_done % per_epoch)


def _positive_int(run_cfg, key):
    value = run_cfg.get(key, None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"run.{key} must be a positive integer for runner_iter_pformer, got {value!r}")
    return value


@registry.register_runner("runner_iter_pformer")
class RunnerIterPFormer(RunnerPFormer, RunnerIter):
    """LAVIS's ``RunnerIter`` with the fixes of ``runner_pformer`` and resume inside a data epoch (module docstring).

    Config keys: LAVIS's (``max_iters``, ``iters_per_inner_epoch``, and every runner_base key but ``max_epoch``).
    """

    def __init__(self, cfg, task, model, datasets, job_id):
        if cfg.run_cfg.get("train_dataset_ratios", None) is not None:
            # RunnerIter.dataloaders reads a local variable before setting it on that path (UnboundLocalError).
            raise ConfigError("run.train_dataset_ratios is not supported by runner_iter_pformer (LAVIS's runner_iter "
                              "fails with it); remove it: the training datasets are then concatenated")
        max_iters = _positive_int(cfg.run_cfg, "max_iters")
        per_inner = _positive_int(cfg.run_cfg, "iters_per_inner_epoch")
        if max_iters % per_inner:
            logging.warning("run.max_iters %d is not a multiple of run.iters_per_inner_epoch %d: the last inner epoch "
                            "runs %d iterations past max_iters (LAVIS's RunnerIter)", max_iters, per_inner,
                            per_inner - max_iters % per_inner)
        super().__init__(cfg, task, model, datasets, job_id)
        self._resume = None

    # --- loaders ---------------------------------------------------------------------------------------------

    iter_loader_class = ResumableIterLoader

    def create_loaders(self, *args, **kwargs):
        """LAVIS's loaders, the training one over a ResumableSampler, wrapped in a ResumableIterLoader."""
        with mock.patch.object(lavis_runner_base, "DataLoader", self._dataloader):
            return super().create_loaders(*args, **kwargs)

    def _dataloader(self, dataset, **kwargs):
        if not kwargs.get("drop_last", False):  # evaluation loaders (LAVIS drops the last batch of training only)
            return DataLoader(dataset, **kwargs)
        sampler = ResumableSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                   seed=int(self.config.run_cfg.get("seed", 0)))
        kwargs.update(sampler=sampler, shuffle=False, generator=torch.Generator())
        return DataLoader(dataset, **kwargs)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _write_checkpoint(self, cur_iters, is_best=False):
        """The trainable tensors (as runner_base; LAVIS's RunnerIter saves the frozen ViT too), optimizer, scaler,
        config, ``iters`` and the data position."""
        model = self.unwrap_dist_model(self.model)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        loader = self.train_loader
        data = None
        if isinstance(loader, ResumableIterLoader):
            data = {"epoch": loader.epoch, "batches_in_epoch": loader.batches_in_epoch,
                    "batches_per_epoch": len(loader), "world_size": get_world_size()}
        save = {
            "model": {k: v for k, v in model.state_dict().items() if k not in frozen},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "iters": int(cur_iters),
            "format": ITERS_FORMAT,
            "data": data,
        }
        path = os.path.join(self.output_dir, "checkpoint_{}.pth".format("best" if is_best else cur_iters))
        logging.info("Saving checkpoint at iteration %s to %s", cur_iters, path)
        torch.save(save, path)

    def _load_checkpoint(self, url_or_filename):
        """Model (strict), optimizer, scaler and ``iters``; the RNG states and the data position are applied when
        training starts (``train_iters``)."""
        if is_url(url_or_filename):
            raise ResumeError(f"run.resume_ckpt_path: {url_or_filename} is a URL; runner_iter_pformer resumes from "
                              "a local checkpoint_<iters>.pth / checkpoint_last.pth")
        check_resume_file(url_or_filename)
        fix = "Resume with the checkpoint_last.pth of a runner_iter_pformer run of this same model and config."
        try:
            checkpoint = torch.load(url_or_filename, map_location="cpu", weights_only=True)
            if "iters" not in checkpoint:
                raise KeyError("iters (an epoch-runner checkpoint?)")
            self.unwrap_dist_model(self.model).load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.scaler and checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ResumeError(f"run.resume_ckpt_path: cannot resume from {url_or_filename} ({type(e).__name__}: "
                              f"{e}). {fix}") from e
        self.start_iters = int(checkpoint["iters"])
        rng = read_rng_states(url_or_filename, self.start_iters)
        self._resume = {"iters": self.start_iters, "rng": rng, "data": checkpoint.get("data")}
        logging.info("Resuming at iteration %d from %s (model, optimizer%s, lr schedule position, data position; "
                     "RNG states %s)", self.start_iters, url_or_filename, ", grad scaler" if self.scaler else "",
                     "restored" if rng is not None else "NOT restored")

    # --- training ----------------------------------------------------------------------------------------------

    def train_iters(self, epoch, start_iters):
        """One inner epoch (LAVIS's), after positioning a resumed run. With validation splits LAVIS's RunnerIter
        writes only checkpoint_best.pth; here the inner epoch's checkpoint is written too (before validating),
        so that such a run can resume."""
        if self._resume is not None:
            resume, self._resume = self._resume, None
            self._position_train_loader(resume)
            epoch = self.cur_epoch  # the data epoch of the resumed position (RunnerIter read it before)
        stats = super().train_iters(epoch, start_iters)
        if len(self.valid_splits) > 0:
            self._save_checkpoint(start_iters + self.iters_per_inner_epoch, is_best=False)
        return stats

    def _position_train_loader(self, resume):
        loader = self.train_loader  # built now if needed, before the RNG states are restored
        if resume["rng"] is not None:
            set_rng_states(resume["rng"])
        if not isinstance(loader, ResumableIterLoader):
            logging.warning("resume: the training loader is a %s: the data order of the resumed run is not aligned "
                            "with an uninterrupted run", type(loader).__name__)
            return
        saved = resume["data"] or {}
        now = {"batches_per_epoch": len(loader), "world_size": get_world_size()}
        if any(saved.get(k) not in (None, v) for k, v in now.items()):
            logging.warning("resume: the checkpoint's run had %s, this run has %s (dataset, batch size or number of "
                            "processes changed): the data order of the resumed run is not aligned with it",
                            {k: saved.get(k) for k in now}, now)
        loader.seek(resume["iters"])
        logging.info("resume: data epoch %d, batch %d of %d", loader.epoch, loader.batches_in_epoch, len(loader))
        if dist.is_initialized():
            dist.barrier()
