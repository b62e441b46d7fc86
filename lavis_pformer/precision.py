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
