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
  pauses only when it has worker processes;
- streaming sets train here: ``image_text_shards`` (webdataset shards, :class:`~lavis_pformer.iter_loaders.
  ShardIterLoader`, resumed at the shard and sample each reader had reached) and LAVIS's own webdataset
  pipelines (``laion2B_multi``, read as LAVIS reads them, not positioned on resume);
- ``run.train_dataset_ratios`` (``{dataset: ratio}``) works, as LAVIS means it (its RunnerIter fails with it):
  each batch comes from one dataset, drawn by ratio (LAVIS's ``MultiIterLoader``); every loader of the mix is
  positioned on resume, and the draws continue as in the uninterrupted run (the RNG sidecar).

What resuming needs: the same dataset, batch size and number of processes (the loader's batches per data epoch
are recorded in the checkpoint; if they differ, the run continues with a warning that the data order is not
aligned). Only checkpoints written at the end of an inner epoch exist: a run killed inside an inner epoch
repeats its iterations since the last checkpoint (choose ``iters_per_inner_epoch`` accordingly).
"""
import logging
import os
import zlib

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lavis.common.dist_utils import get_rank, get_world_size
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.datasets.data_utils import reorg_datasets_by_split
from lavis.datasets.datasets.base_dataset import ConcatDataset
from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
from lavis.runners.runner_iter import RunnerIter

from lavis_pformer.datasets.shard_stream import ShardCaptionDataset
from lavis_pformer.errors import ConfigError, ResumeError
from lavis_pformer.iter_loaders import MixedIterLoader, ShardIterLoader
from lavis_pformer.resume import check_resume_file, read_rng_states, set_rng_states
from lavis_pformer.runtime import RunnerPFormer, NoPauseIterLoader

ITERS_FORMAT = "lavis_pformer/iter-checkpoint-v1"
LOADER_STATES_FORMAT = "lavis_pformer/loader-states-v1"  # checkpoint["data"]: every rank's training loader state


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

    def state(self):
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "batches_per_epoch": len(self)}

    def load_state(self, state):
        """Continue from ``state``; True if it was recorded with as many batches per data epoch."""
        fits = state.get("batches_per_epoch") == len(self)
        if not fits:
            logging.warning("resume: a training loader had %s batches per data epoch, it has %d now (dataset, batch "
                            "size or number of processes changed): its data order is not aligned with the checkpoint's "
                            "run", state.get("batches_per_epoch"), len(self))
        self.start_epoch(state["epoch"], state["batches_in_epoch"])
        return fits

    def describe(self):
        return f"data epoch {self.epoch}, batch {self.batches_in_epoch} of {len(self)}"


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

    trains_on_streams = True  # endless shard streams have no epoch length: this runner counts iterations

    def __init__(self, cfg, task, model, datasets, job_id):
        max_iters = _positive_int(cfg.run_cfg, "max_iters")
        per_inner = _positive_int(cfg.run_cfg, "iters_per_inner_epoch")
        if max_iters % per_inner:
            logging.warning("run.max_iters %d is not a multiple of run.iters_per_inner_epoch %d: the last inner epoch "
                            "runs %d iterations past max_iters (LAVIS's RunnerIter)", max_iters, per_inner,
                            per_inner - max_iters % per_inner)
        super().__init__(cfg, task, model, datasets, job_id)
        self._resume = None

    # --- loaders ---------------------------------------------------------------------------------------------

    @property
    def dataloaders(self):
        """{split: loader}. Evaluation splits: LAVIS's loaders (one dataset per split). ``train``: one loader per
        part of the training mix (:meth:`_training_mix`), a ResumableIterLoader for a map-style set, a
        ShardIterLoader for ``image_text_shards``, LAVIS's plain DataLoader iterator for another webdataset
        pipeline (LAVIS's ``laion2B_multi``); several are mixed by a MixedIterLoader.

        LAVIS's RunnerIter builds them with ``train_dataset_ratios`` through a variable it never sets
        (UnboundLocalError) and cannot concatenate an IterableDataset that is not a webdataset pipeline: this
        replaces it.
        """
        if self._dataloaders is None:
            mix = self._training_mix(self.datasets)
            by_split = reorg_datasets_by_split(self.datasets)
            self.datasets = {}
            for split, sets in sorted(by_split.items()):
                if split == "train":
                    continue
                if len(sets) > 1:
                    raise ConfigError(f"{len(sets)} datasets have a {split} split; LAVIS evaluates one dataset per "
                                      f"split: keep the {split} split in one of them")
                self.datasets[split] = sets[0]
            splits = sorted(self.datasets)
            run = self.config.run_cfg
            loaders = self.create_loaders(datasets=[self.datasets[s] for s in splits], num_workers=run.num_workers,
                                          batch_sizes=[run.batch_size_eval] * len(splits), is_trains=[False] * len(splits),
                                          collate_fns=[getattr(self.datasets[s], "collater", None) for s in splits])
            self._dataloaders = dict(zip(splits, loaders))
            if mix:
                self.datasets["train"] = mix[0][1] if len(mix) == 1 else tuple(dataset for _, dataset, _ in mix)
                train = [self._training_loader(dataset) for _, dataset, _ in mix]
                if len(train) > 1:
                    logging.info("training batches drawn from %s with ratios %s", [name for name, _, _ in mix],
                                 [ratio for _, _, ratio in mix])
                    train = [MixedIterLoader(train, ratios=[ratio for _, _, ratio in mix])]
                self._dataloaders["train"] = train[0]
        return self._dataloaders

    def _training_mix(self, datasets):
        """[(name, training dataset, ratio)]. Without ``run.train_dataset_ratios`` as LAVIS: the map-style sets
        concatenated (one part, sampled in proportion to their sizes), and each streaming set a part of its own,
        all parts equally likely. With it (``{builder name: ratio}``, one per dataset with a train split), each
        dataset is a part drawn with its ratio, as LAVIS means the key."""
        trains = [(name, d["train"]) for name, d in datasets.items() if "train" in d]
        ratios = self.config.run_cfg.get("train_dataset_ratios", None)
        if ratios is None:
            maps = [(name, d) for name, d in trains if not isinstance(d, IterableDataset)]
            mix = [("+".join(name for name, _ in maps), ConcatDataset([d for _, d in maps]), 1.0)] if maps else []
            return mix + [(name, d, 1.0) for name, d in trains if isinstance(d, IterableDataset)]
        names = [name for name, _ in trains]
        if not OmegaConf.is_dict(ratios) or set(ratios) != set(names):
            raise ConfigError(f"run.train_dataset_ratios must give a ratio to each dataset with a train split, "
                              f"{names}, and to nothing else; got {OmegaConf.to_container(ratios) if OmegaConf.is_config(ratios) else ratios!r}")
        for name in names:
            value = ratios[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"run.train_dataset_ratios.{name} must be a positive number, got {value!r}")
        return [(name, d, float(ratios[name])) for name, d in trains]

    def _training_loader(self, dataset):
        run = self.config.run_cfg
        batch_size, workers, seed = run.batch_size_train, run.num_workers, int(run.get("seed", 0))
        if isinstance(dataset, ShardCaptionDataset):
            dataset.check_split(get_world_size(), workers)
            return ShardIterLoader(dataset, batch_size, workers, seed, pin_memory=self.cuda_enabled)
        if isinstance(dataset, IterableDataset):  # another webdataset pipeline: as LAVIS's runner loads it
            return iter(DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=self.cuda_enabled))
        sampler = ResumableSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), seed=seed)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=self.cuda_enabled,
                            sampler=sampler, shuffle=False, collate_fn=getattr(dataset, "collater", None),
                            drop_last=True, generator=torch.Generator())
        if self.cuda_enabled:
            loader = PrefetchLoader(loader)
        return ResumableIterLoader(loader, use_distributed=self.use_distributed)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _save_checkpoint(self, cur_iters, is_best=False):
        """Every rank: the position of every rank's training loader is gathered first (a collective call), unless
        the loader is one ResumableIterLoader (the same position on every rank) or the checkpoint is the best one
        (saved by rank 0 alone)."""
        loader = self.train_loader
        self._loader_states = None
        if not is_best and not isinstance(loader, ResumableIterLoader) and hasattr(loader, "state"):
            states = [loader.state()]
            if get_world_size() > 1:
                states = [None] * get_world_size()
                dist.all_gather_object(states, loader.state())
            self._loader_states = {"format": LOADER_STATES_FORMAT, "world_size": get_world_size(), "ranks": states}
        super()._save_checkpoint(cur_iters, is_best=is_best)

    def _write_checkpoint(self, cur_iters, is_best=False):
        """The trainable tensors (as runner_base; LAVIS's RunnerIter saves the frozen ViT too), optimizer, scaler,
        config, ``iters`` and the data position."""
        model = self.unwrap_dist_model(self.model)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        loader = self.train_loader
        data = self._loader_states
        if isinstance(loader, ResumableIterLoader):
            data = dict(loader.state(), world_size=get_world_size())
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
        if hasattr(self.train_loader, "log_counts"):  # what the shard readers of this rank skipped so far
            self.train_loader.log_counts()
        if len(self.valid_splits) > 0:
            self._save_checkpoint(start_iters + self.iters_per_inner_epoch, is_best=False)
        return stats

    def _position_train_loader(self, resume):
        loader = self.train_loader  # built now if needed, before the RNG states are restored
        if resume["rng"] is not None:
            set_rng_states(resume["rng"])
        saved = resume["data"] or {}
        if isinstance(loader, ResumableIterLoader):
            now = {"batches_per_epoch": len(loader), "world_size": get_world_size()}
            if any(saved.get(k) not in (None, v) for k, v in now.items()):
                logging.warning("resume: the checkpoint's run had %s, this run has %s (dataset, batch size or number "
                                "of processes changed): the data order of the resumed run is not aligned with it",
                                {k: saved.get(k) for k in now}, now)
            loader.seek(resume["iters"])
        elif saved.get("format") == LOADER_STATES_FORMAT and hasattr(loader, "load_state"):
            if saved["world_size"] != get_world_size():
                logging.warning("resume: the checkpoint's run had %d processes, this one has %d: the training data "
                                "are read from the start again", saved["world_size"], get_world_size())
            else:
                loader.load_state(saved["ranks"][get_rank()])
        else:
            logging.warning("resume: the training loader (%s) has no position in the checkpoint: the data order of "
                            "the resumed run is not aligned with the checkpoint's run", type(loader).__name__)
        if hasattr(loader, "describe"):
            logging.info("resume: %s", loader.describe())
        if dist.is_initialized():
            dist.barrier()
