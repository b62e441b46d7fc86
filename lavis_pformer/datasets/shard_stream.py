"""``ShardCaptionDataset``: image-caption pairs streamed from webdataset shards, endlessly, with every unreadable
sample or shard counted, and a position from which a resumed run continues.

Who reads what: the shard list is split by rank (``webdataset.split_by_node``: rank r of R takes shards r, r + R,
...) and then by DataLoader worker (``webdataset.split_by_worker``), so every reading process has its own shards,
disjoint from all others. Each process goes over its shards in *passes*: pass p reads them in an order shuffled by
(seed, rank, worker, p), and the samples go through a shuffle buffer of ``shuffle_buffer`` raw samples
(webdataset's ``shuffle``, seeded the same way) before they are decoded. The stream never ends; the iteration
runner decides how many batches to take.

Counted and bounded (:class:`~lavis_pformer.datasets.shard_samples.BadShare`): a sample without its image or
caption file, or whose image does not decode or caption does not parse, is skipped; a shard that cannot be read to
its end (damaged, truncated) is left at that point. Each is logged (the first ``LOGGED_PER_PROCESS`` samples and
every shard, naming the rank, the worker, the shard and the sample) and counted; past the bound the run stops with a
DataError naming the last shard.

Position: every item carries where its process stood when the item left the shuffle buffer (``POSITION``: pass,
index of the shard in the pass order, samples read from that shard, and the counts). A process started from a
position reopens that shard, skips (reads without decoding) the samples already read from it and continues the
same pass with a fresh shuffle buffer. So, after a resume from a checkpoint, no sample trained on before is read
again in the same pass, and what the buffer held at that moment (at most ``shuffle_buffer`` samples per process)
is skipped until the next pass (docs/data.md).
"""
import logging
import os
import random

import webdataset as wds
from torch.utils.data import IterableDataset
from torch.utils.data.dataloader import default_collate

from lavis_pformer.datasets.shard_samples import SHARD_ERRORS, BadSample
from lavis_pformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

POSITION = "shard_position"  # the key of an item's (and a batch's) position
LOGGED_PER_PROCESS = 10  # bad samples logged one by one per reading process; all are counted
COUNTS = ("read", "bad_samples", "opened", "bad_shards")


def fresh_position(worker):
    """Where a reading process starts a run: pass 0, its first shard."""
    return {"worker": worker, "pass": 0, "shard": 0, "in_shard": 0, **{k: 0 for k in COUNTS}}


def reader_identity():
    """(rank, world size, worker, workers) as webdataset's splitters see them."""
    return wds.utils.pytorch_worker_info()


class _ShardReader:
    """The raw samples of one process's shards, pass after pass, from ``position`` on; ``position`` is kept current
    (it describes the samples read so far)."""

    def __init__(self, shards, seed, position, counter):
        self.shards, self.seed, self.position, self.counter = shards, seed, dict(position), counter

    def order(self, pass_number):
        rank, _, worker, _ = reader_identity()
        order = list(self.shards)
        random.Random(f"{self.seed}/order/{rank}/{worker}/{pass_number}").shuffle(order)
        return order

    def __iter__(self):
        pos = self.position
        while True:
            order, read_before = self.order(pos["pass"]), pos["read"]
            whole_pass = pos["shard"] == 0 and pos["in_shard"] == 0
            while pos["shard"] < len(order):
                url, skip = order[pos["shard"]], pos["in_shard"]
                if skip == 0:
                    pos["opened"] += 1
                try:
                    for i, raw in enumerate(wds.tarfile_samples([{"url": url}])):
                        if i < skip:
                            continue  # read before the resumed checkpoint: not decoded, not counted again
                        pos["in_shard"], pos["read"] = i + 1, pos["read"] + 1
                        yield raw
                except SHARD_ERRORS as e:
                    pos["bad_shards"] += 1
                    self.counter.bad_shard(url, e, pos)
                pos["shard"], pos["in_shard"] = pos["shard"] + 1, 0
            if whole_pass and pos["read"] == read_before:
                raise DataError(f"{self.counter.where()}: a whole pass over its {len(order)} shard(s) gave no "
                                "sample (every one failed, see the warnings above); check or rewrite these shards")
            pos["pass"], pos["shard"] = pos["pass"] + 1, 0


class ShardCaptionDataset(IterableDataset):
    """Endless ``{"image", "text_input", "instance_id"}`` items (``instance_id``: ``<shard file>/<sample key>``)
    from webdataset shards, each with its reader's position under ``POSITION`` (removed by :meth:`collate`, which
    keeps the batch's last one). Module docstring: who reads what, the counting, the position.

    ``shards``: paths; ``sample_format``: :class:`~lavis_pformer.datasets.shard_samples.SampleFormat`;
    ``bad_share``: :class:`~lavis_pformer.datasets.shard_samples.BadShare`. The runner sets ``seed`` (run.seed)
    and, to resume, ``start`` (one position per worker, from :meth:`collate`'d batches).
    """

    def __init__(self, shards, vis_processor, text_processor, sample_format, bad_share, shuffle_buffer=1000,
                 label="datasets.image_text_shards"):
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ConfigError(f"{label}.build_info.shuffle_buffer must be an integer >= 0 (0: no shuffle buffer), got "
                              f"{shuffle_buffer!r}")
        self.shards, self.vis_processor, self.text_processor = list(shards), vis_processor, text_processor
        self.sample_format, self.bad_share, self.shuffle_buffer, self.label = sample_format, bad_share, shuffle_buffer, label
        self.seed, self.start = 0, []

    def check_split(self, world, workers):
        """ConfigError unless every one of ``world`` ranks x ``workers`` DataLoader workers gets a shard."""
        readers = world * max(1, workers)
        if len(self.shards) < readers:
            raise ConfigError(
                f"{self.label}: {len(self.shards)} shard(s) cannot give each of the {world} rank(s) x {max(1, workers)} "
                f"DataLoader worker(s) its own shard: write the data as at least {readers} shards (python -m "
                "lavis_pformer.datasets.to_shards --shard-size ...) or lower run.num_workers")

    def __iter__(self):
        rank, world, worker, workers = reader_identity()
        shards = list(wds.split_by_worker(wds.split_by_node(self.shards)))  # shards[rank::world][worker::workers]
        if not shards:
            self.check_split(world, workers)
        start = self.start[worker] if worker < len(self.start) and self.start[worker] else fresh_position(worker)
        counter = _BadCounter(self, rank, worker)
        reader = _ShardReader(shards, self.seed, start, counter)
        stream = iter(reader)
        if self.shuffle_buffer > 1:
            rng = random.Random("{}/buffer/{}/{}/{pass}/{shard}/{in_shard}".format(self.seed, rank, worker, **start))
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        for raw in stream:
            try:
                image, caption = self.sample_format.parse(raw)
            except BadSample as e:
                counter.bad_sample(raw, e, reader.position)
                continue
            yield {
                "image": self.vis_processor(image),
                "text_input": self.text_processor(caption),
                "instance_id": f"{os.path.basename(raw['__url__'])}/{raw['__key__']}",
                POSITION: dict(reader.position),
            }

    @staticmethod
    def collate(items):
        """LAVIS's default collation of the items, plus the position of the last one under ``POSITION``."""
        position = items[-1][POSITION]
        batch = default_collate([{k: v for k, v in item.items() if k != POSITION} for item in items])
        batch[POSITION] = position
        return batch


class _BadCounter:
    """Counts, logs and bounds the unreadable samples and shards of one reading process."""

    def __init__(self, dataset, rank, worker):
        self.label, self.bound, self.rank, self.worker = dataset.label, dataset.bad_share, rank, worker
        self.logged = 0
        self.fix = (f"Rewrite or remove the damaged shards, or raise {self.label}.build_info.max_bad_share if this many "
                    "may be skipped")

    def where(self):
        return f"{self.label} rank {self.rank} worker {self.worker}"

    def bad_sample(self, raw, error, position):
        position["bad_samples"] += 1
        last = f"shard {raw.get('__url__')}, sample {raw.get('__key__')}: {error}"
        if self.logged < LOGGED_PER_PROCESS:
            self.logged += 1
            logger.warning("%s: skipped an unreadable sample (%d so far of %d read): %s%s", self.where(),
                           position["bad_samples"], position["read"], last,
                           "; further ones of this process are counted, not logged one by one"
                           if self.logged == LOGGED_PER_PROCESS else "")
        self.bound.check_samples(position["bad_samples"], position["read"], self.where(), last, self.fix)

    def bad_shard(self, url, error, position):
        why = str(error.args[0] if error.args else error).split(" @ <")[0]  # webdataset appends " @ <stream>"
        last = f"shard {url} ({type(error).__name__}: {why})"
        logger.warning("%s: could not read the rest of %s (%d bad shard(s) of %d opened so far; the samples before "
                       "the damage are kept)", self.where(), last, position["bad_shards"], position["opened"])
        self.bound.check_shards(position["bad_shards"], position["opened"], self.where(), last, self.fix)


def shard_counts(positions):
    """The counts (read, bad_samples, opened, bad_shards) summed over positions (None: nothing read yet)."""
    return {k: sum(p[k] for p in positions if p) for k in COUNTS}

