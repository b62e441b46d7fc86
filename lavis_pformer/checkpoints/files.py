"""Checkpoint files: read safely (``torch.load(weights_only=True)``, errors that name the file) and what their
entries and tensor names tell (the run's arch, the stage record, the Q-Former layers with cross-attention)."""
import os
import re

import torch

from lavis_pformer.errors import CheckpointError, MissingFileError


def read_checkpoint(path, what="checkpoint"):
    """``torch.load(weights_only=True)`` of a local file, with errors that name the file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what}: no file at {path} (cwd {os.getcwd()}); check the path in the config or --options")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles with code, not a torch file at all
        raise CheckpointError(f"{what}: cannot read {path} as a weights-only torch checkpoint ({e})") from e


def state_dict_of(checkpoint, path, what="checkpoint"):
    """The state dict of a checkpoint read from ``path`` (its "model" entry if it has one)."""
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what}: {path} does not hold a state dict")
    return checkpoint


def load_state_dict_file(path, what="checkpoint"):
    """The state dict of a checkpoint file (its "model" entry if it has one)."""
    return state_dict_of(read_checkpoint(path, what), path, what)


def checkpoint_arch(checkpoint):
    """``model.arch`` of the run that wrote a LAVIS training checkpoint, or None."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    return model.get("arch") if isinstance(model, dict) else None


# Q-Former tensors of a cross-attention block: "<...>.encoder.layer.<i>.crossattention.<...>"
CROSS_ATTENTION = re.compile(r"^(?:.*\.)?encoder\.layer\.(\d+)\.crossattention\.")
QFORMER_LAYER = re.compile(r"^(?:.*\.)?Qformer\.bert\.encoder\.layer\.(\d+)\.")
EXTRA_STATE_KEY = "_extra_state"  # where nn.Module.state_dict puts get_extra_state() of the top module


def cross_attention_layers(keys):
    """Indices of the Q-Former layers that have cross-attention tensors among ``keys``."""
    return sorted({int(m.group(1)) for k in keys for m in [CROSS_ATTENTION.match(k)] if m})


def cross_attention_freq_of(layers, num_layers):
    """The ``cross_attention_freq`` (LAVIS: layer i has cross-attention iff i % freq == 0) that gives
    ``layers`` in a Q-Former of ``num_layers`` layers, or None if no frequency does."""
    for freq in range(1, max(num_layers, 1) + 1):
        if [i for i in range(num_layers) if i % freq == 0] == list(layers):
            return freq
    return None
