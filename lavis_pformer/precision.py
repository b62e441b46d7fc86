"""The precisions a config names (``DTYPES``), and a CPU autocast that behaves like LAVIS's CUDA autocast where the two
differ, for running GPU precisions on a CPU.

LAVIS runs its fp16 / bf16 backbones under ``torch.cuda.amp.autocast`` (``maybe_autocast``, and the runner's
``run.amp``); on a CPU it runs no autocast at all, so a model configured with GPU precisions cannot run there.
The plugin uses :func:`cpu_autocast` in those places on the CPU (``BackboneMixin.maybe_autocast``, the tasks'
training step). It is ``torch.autocast("cpu", dtype)`` plus one difference of CUDA autocast that matters for
BLIP-2: CUDA autocast runs ``layer_norm`` in fp32 (its fp32 list casts the input *and* the weight), CPU autocast
leaves it alone, and the CPU kernel refuses an fp32 input with bf16 / fp16 parameters ("mixed dtype (CPU):
expect parameter to have scalar type of Float"), which happens as soon as an fp32 activation reaches a
low-precision LLM's first LayerNorm. Inside :func:`cpu_autocast` such a call runs in fp32, as on a GPU.

:func:`cat_in_dtype` joins a soft prompt with an LLM's token embeddings where autocast (CUDA or CPU) would refuse
the mix of precisions.
"""
import contextlib

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # llm_precision and the like
LOW_PRECISION = (torch.float16, torch.bfloat16)
_active = [0]


def _layer_norm_as_cuda_autocast(original):
    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        params = [t for t in (weight, bias) if t is not None]
        if torch.is_autocast_enabled("cpu") and any(t.dtype != input.dtype for t in params):
            return original(input.float(), normalized_shape, None if weight is None else weight.float(),
                            None if bias is None else bias.float(), eps)
        return original(input, normalized_shape, weight, bias, eps)

    layer_norm.original = original
    return layer_norm


@contextlib.contextmanager
def cpu_autocast(dtype=torch.float16):
    """``torch.autocast("cpu", dtype)`` with ``layer_norm`` of mixed dtypes run in fp32 (as CUDA autocast does)."""
    if _active[0] == 0:
        F.layer_norm = _layer_norm_as_cuda_autocast(F.layer_norm)
    _active[0] += 1
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        _active[0] -= 1
        if _active[0] == 0:
            F.layer_norm = F.layer_norm.original


def cat_in_dtype(tensors, dtype, dim=1):
    """``torch.cat`` of ``tensors`` cast to ``dtype``, outside autocast.

    Autocast refuses to concatenate fp16 with bf16 tensors ("Unexpected floating ScalarType in
    at::autocast::prioritize"), and under fp16 autocast it sees even two bf16 tensors as such a mix: a soft prompt
    cast to a bf16 LLM's dtype and joined with its token embeddings fails under ``run.amp`` (the runner's fp16
    autocast). Outside autocast the concatenation is the plain one, in ``dtype``.
    """
    with torch.autocast(tensors[0].device.type, enabled=False):
        return torch.cat([t.to(dtype) for t in tensors], dim=dim)
