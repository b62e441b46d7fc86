"""Resuming a run: the checkpoint to resume from, checked before anything is built, and the RNG states of every
rank saved beside each per-epoch checkpoint (``checkpoint_N.rng.pth``) and restored on resume
(see docs/reliability.md for what is bit-exact)."""
import logging
import os
import random
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from lavis.common.dist_utils import get_rank, get_world_size
from lavis.common.utils import is_url

from lavis_pformer.errors import MissingFileError, ResumeError

RNG_SUFFIX = ".rng.pth"
RNG_FORMAT = "lavis_pformer/rng-v1"


def resolve_resume_path(run_cfg):
    """Check ``run.resume_ckpt_path`` before anything is built and pin it to its real path.

    The runner points ``<output_dir>/latest`` at the new job folder before LAVIS loads the checkpoint,
    so ``.../latest/checkpoint_last.pth`` must be resolved first (else it names the new, empty folder).
    """
    path = run_cfg.get("resume_ckpt_path", None)
    if not path or is_url(path) or run_cfg.get("evaluate", False):
        return
    check_resume_file(path)
    run_cfg.resume_ckpt_path = os.path.realpath(path)


def check_resume_file(path):
    """A clear error for a resume checkpoint that is missing or truncated (LAVIS: 'path is invalid' / zip errors)."""
    fix = ("set run.resume_ckpt_path to the checkpoint_last.pth (or a checkpoint_N.pth) of the run to "
           "continue, written by train.py")
    if not os.path.isfile(path):
        raise MissingFileError(f"run.resume_ckpt_path: no file at {path} (cwd {os.getcwd()}); {fix}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; truncation loses its directory
        raise ResumeError(f"run.resume_ckpt_path: {path} is truncated or not a torch checkpoint; {fix}")


def process_rng_state():
    """This process's RNG states, as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss_next],
    }


def set_rng_states(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss_next))


def gather_rng_states(epoch):
    """{"format", "epoch", "ranks": [state of rank 0, rank 1, ...]}; a collective call under DDP."""
    states = [process_rng_state()]
    if get_world_size() > 1:
        states = [None] * get_world_size()
        dist.all_gather_object(states, process_rng_state())
    return {"format": RNG_FORMAT, "epoch": int(epoch), "ranks": states}


def read_rng_states(checkpoint_path, epoch):
    """This rank's states from ``checkpoint_<epoch>.rng.pth`` beside ``checkpoint_path``, or None (with a warning)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"checkpoint_{epoch}{RNG_SUFFIX}")
    rank, world = get_rank(), get_world_size()
    why = None
    if not os.path.isfile(path):
        why = f"{path} does not exist (a checkpoint of LAVIS's own runner, or the file was not copied)"
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged sidecar must not stop a resume
            saved, why = None, f"{path} cannot be read ({type(e).__name__}: {e})"
        if saved is not None:
            if not isinstance(saved, dict) or saved.get("format") != RNG_FORMAT or saved.get("epoch") != epoch:
                why = f"{path} does not hold the RNG states of epoch {epoch}"
            elif len(saved["ranks"]) != world:
                why = f"{path} was written by {len(saved['ranks'])} ranks, this run has {world}"
            else:
                return saved["ranks"][rank]
    logging.warning(
        "resume: RNG states not restored: %s. Training continues, but the data order, masking and dropout "
        "of the resumed epochs differ from an uninterrupted run (not bit-exact).", why,
    )
    return None
