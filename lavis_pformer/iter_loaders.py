"""Training loaders of ``runner_iter_pformer`` beside ``ResumableIterLoader`` (map-style sets): endless batches
from webdataset shards, and LAVIS's mixing of several loaders by ratio. Each says where it is (``state()``, plain
lists, dicts and numbers, gathered from every rank into the iteration checkpoint) and goes back there
(``load_state``) when a run resumes.
"""
import logging
import zlib

import torch
from torch.utils.data import DataLoader

from lavis.common.dist_utils import get_rank
from lavis.datasets.datasets.dataloader_utils import MultiIterLoader

from lavis_pformer.datasets.shard_stream import POSITION, ShardCaptionDataset, shard_counts


class ShardIterLoader:
    """Endless batches of a :class:`~lavis_pformer.datasets.shard_stream.ShardCaptionDataset` through a DataLoader
    (``num_workers`` processes, or this one), and the position of each reading process after its last batch given
    out (batches the workers have prepared but the training loop has not taken do not count).

    The DataLoader starts at the first batch asked for, from the positions set by :meth:`load_state` (a resumed
    run) or from the start; its worker seeds come from (seed, rank, those positions), not from the global RNG.
    """

    def __init__(self, dataset, batch_size, num_workers, seed, pin_memory=False):
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, batch_size, num_workers, pin_memory
        self.seed = dataset.seed = seed
        self.positions = [None] * max(1, num_workers)  # None: this reader has given no batch yet (starts afresh)
        self._batches = None

    def _start(self):
        self.dataset.start = list(self.positions)
        generator = torch.Generator()
        generator.manual_seed(zlib.crc32(f"{self.seed}/{get_rank()}/{self.positions}".encode()))
        self._batches = iter(DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                        collate_fn=ShardCaptionDataset.collate, pin_memory=self.pin_memory,
                                        generator=generator))

    def __next__(self):
        if self._batches is None:
            self._start()
        batch = next(self._batches)
        position = batch.pop(POSITION)
        self.positions[position["worker"]] = position
        return batch

    def __iter__(self):
        return self

    def state(self):
        return {"kind": "shards", "readers": list(self.positions)}

    def load_state(self, state):
        """Continue from ``state`` (of a run with as many readers per rank); False (with a warning) if it does not
        fit, and the loader then starts afresh."""
        readers = state.get("readers") if isinstance(state, dict) and state.get("kind") == "shards" else None
        if readers is None or len(readers) != len(self.positions):
            logging.warning("resume: %s: the checkpoint's shard positions are for %s reader(s) per rank, this run has "
                            "%d (run.num_workers changed?): the shards are read from the start again",
                            self.dataset.label, len(readers) if readers is not None else "no",
                            len(self.positions))
            return False
        self.positions, self._batches = list(readers), None
        return True

    def describe(self):
        started = [p for p in self.positions if p]
        return (f"{self.dataset.label}: {len(started)} of {len(self.positions)} reader(s) continue where they were "
                + ", ".join(f"(worker {p['worker']}: pass {p['pass']}, shard {p['shard']}, sample {p['in_shard']})"
                            for p in started))

    def log_counts(self):
        """One line for this rank: samples read, unreadable ones skipped, shards left unfinished."""
        c = shard_counts(self.positions)
        bad = c["bad_samples"] or c["bad_shards"]
        (logging.warning if bad else logging.info)(
            "%s rank %d: %d samples read, %d unreadable skipped (%.2f%%), %d of %d shards not read to the end",
            self.dataset.label, get_rank(), c["read"], c["bad_samples"], 100 * c["bad_samples"] / max(c["read"], 1),
            c["bad_shards"], c["opened"])


def loader_state(loader):
    """``loader.state()``, or None for a loader that cannot say where it is (a plain iterator)."""
    return loader.state() if hasattr(loader, "state") else None


class MixedIterLoader(MultiIterLoader):
    """LAVIS's ``MultiIterLoader``: each batch comes whole from one of ``loaders``, drawn with probabilities
    ``ratios`` by Python's global RNG (which the RNG sidecar of a checkpoint restores, so a resumed run draws as
    the uninterrupted one); plus the state of every loader."""

    def state(self):
        return {"kind": "mixed", "ratios": list(self.ratios), "loaders": [loader_state(x) for x in self.loaders]}

    def load_state(self, state):
        """Each loader continues from its part of ``state``; False (with a warning) if ``state`` is of another mix."""
        if not isinstance(state, dict) or state.get("kind") != "mixed" or len(state["loaders"]) != len(self.loaders):
            logging.warning("resume: the checkpoint's training loader is not this mix of %d datasets: the datasets are "
                            "read from the start again", len(self.loaders))
            return False
        fits = True
        for loader, part in zip(self.loaders, state["loaders"]):
            if part is None or not hasattr(loader, "load_state"):
                logging.warning("resume: a training loader (%s) has no recorded position: it starts again",
                                type(loader).__name__)
                fits = False
            else:
                fits = loader.load_state(part) and fits
        return fits

    def describe(self):
        return "; ".join(x.describe() for x in self.loaders if hasattr(x, "describe"))

    def log_counts(self):
        for loader in self.loaders:
            if hasattr(loader, "log_counts"):
                loader.log_counts()
