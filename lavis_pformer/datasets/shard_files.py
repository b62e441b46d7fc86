"""The shard files of an ``image_text_shards`` dataset: the list a config names, checked before training.

``build_info.storage`` is a brace pattern (``/data/laion/{00000..01743}.tar``, webdataset's notation: braces,
``::`` between patterns), or a list of them; local files only. Before the first step, rank 0 checks every shard
(it exists, is a non-empty file, starts with a tar header: one ``stat`` and one 512-byte read per shard) and
decodes the first sample of the first shard with the configured keys; the other ranks get the verdict. A shard
that breaks later (a damaged member, a truncation past its first header) is counted while training
(:mod:`~lavis_pformer.datasets.shard_stream`).
"""
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist
import webdataset as wds
from omegaconf import OmegaConf

from lavis.common.dist_utils import get_world_size, is_main_process

from lavis_pformer.datasets.files import local_path
from lavis_pformer.datasets.shard_samples import SHARD_ERRORS, BadSample
from lavis_pformer.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

REWRITE = ("rewrite them (img2dataset, or python -m lavis_pformer.datasets.to_shards from a captions file and an "
           "image folder)")


def expand_shards(storage, key):
    """The shard paths of ``storage`` (a pattern or a list of patterns), absolute, in order."""
    if OmegaConf.is_config(storage):
        storage = OmegaConf.to_object(storage)
    if isinstance(storage, str):
        storage = [storage]
    if not storage or not isinstance(storage, list) or not all(isinstance(p, str) and p.strip() for p in storage):
        raise ConfigError(f"set {key} to the shards: a brace pattern such as /data/laion/{{00000..01743}}.tar, or a "
                          f"list of patterns (got {storage!r})")
    paths = []
    for pattern in storage:
        if "://" in pattern or pattern.startswith("pipe:"):
            raise ConfigError(f"{key}: {pattern} is not a local path; the plugin reads local shards only (copy or "
                              "mount them, e.g. with img2dataset's output folder on a shared file system)")
        paths += [local_path(p) for p in wds.shardlists.expand_urls(pattern)]
    seen = set()
    for path in paths:
        if path in seen:
            raise ConfigError(f"{key} lists the shard {path} twice: each shard must appear once (ranks and "
                              "workers would read it twice per pass)")
        seen.add(path)
    return paths


def shard_problem(path):
    """None if ``path`` looks like a usable shard, else (kind, what is wrong); kind is "missing" or "bad"."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing", "does not exist"
    except OSError as e:
        return "bad", f"cannot be read ({e.strerror})"
    if not os.path.isfile(path):
        return "bad", "is not a file"
    if size == 0:
        return "bad", "is empty (0 bytes)"
    try:
        with tarfile.open(path, "r|*") as tar:  # stream mode: reads the first header only
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError) as e:
        return "bad", f"is not a tar archive ({e})"
    if first is None:
        return "bad", "is a tar archive without any file"
    return None


def first_sample(path):
    """The first sample of the shard at ``path`` (webdataset's grouping of its first members)."""
    return next(iter(wds.tarfile_samples([{"url": path}])), None)


def _verdict(paths, sample_format, label, key):
    """The error (class, message) to raise, or None; computed on rank 0."""
    start = time.time()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = [(path, p) for path, p in zip(paths, pool.map(shard_problem, paths)) if p is not None]
    logger.info("%s: checked %d shards in %.1f s, %d unusable", label, len(paths), time.time() - start, len(problems))
    missing = [path for path, (kind, _) in problems if kind == "missing"]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return MissingFileError, (
            f"{label}: {len(missing)} of the {len(paths)} shards do not exist: {', '.join(missing[:3])}{more} (cwd "
            f"{os.getcwd()}). Fix {key} (it gives {len(paths)} files, {paths[0]} to {paths[-1]}) or restore the files.")
    if problems:
        lines = "\n  ".join(f"{path} {why}" for path, (_, why) in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        return DataError, (f"{label}: {len(problems)} of the {len(paths)} shards cannot be used:\n  {lines}{more}\n"
                           f"Remove them from {key}, or {REWRITE}.")
    try:
        raw = first_sample(paths[0])
    except SHARD_ERRORS as e:
        return DataError, f"{label}: the shard {paths[0]} cannot be read ({type(e).__name__}: {e.args[0]}). {REWRITE}."
    if raw is None:
        return DataError, f"{label}: the shard {paths[0]} holds no sample. Remove it from {key}, or {REWRITE}."
    try:
        sample_format.parse(raw)
    except BadSample as e:
        prefix = key.rsplit(".", 1)[0]
        return DataError, (
            f"{label}: sample {raw['__key__']} of {paths[0]} (the first one) cannot be used: {e}. Each sample needs "
            f"{sample_format.describe()}: set {prefix}.image_key / caption_key (/ caption_field) to the files the "
            f"shards hold, or {REWRITE}.")
    return None


def check_shards(paths, sample_format, label, key):
    """Raise MissingFileError / DataError (naming the shards and the fix) unless every shard of ``paths`` is a
    non-empty tar file and the first sample reads with ``sample_format``. Rank 0 checks; every rank raises."""
    verdict = [None]
    if is_main_process():
        verdict = [_verdict(paths, sample_format, label, key)]
    if get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        error, message = verdict[0]
        raise error(message)
