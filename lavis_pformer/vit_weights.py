"""LAVIS's own ViTs (``eva_clip_g`` / ``clip_L``) from a local copy of the weights LAVIS would download, and the
fingerprint that identifies a frozen ViT."""
import hashlib
import logging
import os
import zipfile
from unittest import mock

import torch

from lavis.models.blip2_models.blip2 import Blip2Base

from lavis_pformer.errors import CheckpointError, MissingFileError

# The files LAVIS downloads for its own ViTs (lavis/models/eva_vit.py, clip_vit.py); its download_cached_file
# keeps them under timm's cache folder (torch.hub's dir + "/checkpoints").
LAVIS_VIT_FILES = {"eva_clip_g": "eva_vit_g.pth", "clip_L": "clip_vit_L.pth"}
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_mode():
    """Whether the environment asks for no network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to 1)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_VARIABLES)


def lavis_vit_cache_file(model_name):
    """Where LAVIS's download keeps the weights of ``eva_clip_g`` / ``clip_L``."""
    import timm.models.hub as timm_hub

    return os.path.join(timm_hub.get_cache_dir(), LAVIS_VIT_FILES[model_name])


def _state_dict_keys(path, what):
    """The tensor names of a flat state-dict file, read with ``weights_only=True`` (memory-mapped when possible)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what}: no file at {path} (cwd {os.getcwd()}); check the path in the config or --options")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated files, pickles with code, not a torch file at all
        raise CheckpointError(f"{what}: cannot read {path} as a weights-only torch checkpoint ({e})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{what}: {path} is not a flat state dict of tensors (as LAVIS's "
                              f"{'/'.join(LAVIS_VIT_FILES.values())} are)")
    keys = set(state)
    del state
    return keys


def lavis_vit_from_file(model_name, weights, img_size, drop_path_rate, use_grad_checkpoint, precision):
    """LAVIS's own ``eva_clip_g`` / ``clip_L`` (its constructor, position-embedding interpolation and fp16 cast)
    with the weights read from the local file ``weights`` instead of LAVIS's download.

    LAVIS loads the file with ``strict=False`` and says nothing; here every parameter of the ViT must be in the
    file (else a CheckpointError: the ViT would stay random), and tensors the ViT has no place for are logged.
    """
    import lavis.models.clip_vit as clip_vit
    import lavis.models.eva_vit as eva_vit

    what = f"model.vit_config.checkpoint ({model_name} weights)"
    keys = _state_dict_keys(weights, what)
    module = eva_vit if model_name == "eva_clip_g" else clip_vit

    def local_file(url, check_hash=True, progress=False):
        logging.info("%s: weights from %s instead of %s", model_name, weights, url)
        return weights

    # create_eva_vit_g / create_clip_vit_L call download_cached_file(url) by the name their module imported.
    try:
        with mock.patch.object(module, "download_cached_file", local_file):
            vit, ln_vision = Blip2Base.init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint,
                                                           precision)
    except RuntimeError as e:  # load_state_dict(strict=False) still refuses tensors of other shapes
        mismatches = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        raise CheckpointError(f"{what}: {weights} holds tensors of other shapes than {model_name} ({mismatches[0]}): "
                              f"it is not LAVIS's {LAVIS_VIT_FILES[model_name]}") from None
    missing = sorted(n for n, _ in vit.named_parameters() if n not in keys)
    if missing:
        raise CheckpointError(
            f"{what}: {weights} lacks {len(missing)} of the {model_name} parameters (e.g. {missing[:3]}), so they would "
            f"stay random: it is not LAVIS's {LAVIS_VIT_FILES[model_name]}. Give a copy of that file (LAVIS downloads "
            f"it to {lavis_vit_cache_file(model_name)})."
        )
    unused = sorted(keys - set(vit.state_dict()))
    if unused:
        logging.warning("%s: %d tensors of %s have no place in %s and are ignored (as LAVIS does), e.g. %s",
                        what, len(unused), weights, model_name, unused[:4])
    return vit, ln_vision


def weights_fingerprint(module):
    """sha256 of a module's tensors (names, shapes, dtypes, values): the identity of a frozen ViT."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
