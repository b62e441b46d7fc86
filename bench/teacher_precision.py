"""The frozen P-Former teacher in fp32, fp16 or bf16 (``model.teacher_precision``) at a benchmark's sizes.

For each teacher precision, on the plugin model of a training-step pair: the teacher's bytes, the model's
footprint (params + buffers + AdamW state + step peak) over the stock model's, and ``loss_align`` and its gradient
on every trainable tensor, on the same batch and the same weights, next to those with the fp32 teacher:

    loss change = |L - L_fp32| / |L_fp32|,   gradient change = ||g - g_fp32|| / ||g_fp32||.
"""
import torch

import measure as M
from lavis_pformer.pformer import PFormer
from train_step_pair import DTYPES, step_autocast


def load_teacher(path, precision, device):
    """The teacher as ``setup_alignment`` builds it: the fp32 file, cast to ``precision``, frozen, eval mode."""
    teacher = PFormer.load(path).to(device=device, dtype=DTYPES[precision])
    return teacher.requires_grad_(False).eval()


def align_loss_and_grad(model, samples, step_precision, device):
    """(loss_align, its gradient on every trainable tensor as one fp32 vector), with fixed dropout draws."""
    model.train()
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    with step_autocast(step_precision, device):
        loss = model(samples)["loss_align"]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([g.float().flatten() for g in grads if g is not None])
    return loss.detach().float(), flat


def compare(model, step, stock_footprint, teacher_path, precisions, step_precision, device):
    """{precision: measurements} (see the module docstring); the model keeps its own teacher at the end.

    ``step``: the model's ``TrainStep`` (its AdamW state is counted; one step per precision measures the peak).
    The losses and gradients are all taken before any of those steps, on the same weights.
    """
    own = model.pformer_teacher
    results, reference = {}, None
    try:
        for precision in sorted(precisions, key=lambda p: p != "fp32"):  # fp32 first: the reference
            model.pformer_teacher = load_teacher(teacher_path, precision, device)
            loss, grad = align_loss_and_grad(model, step.samples, step_precision, device)
            if precision == "fp32":
                reference = (loss, grad)
            entry = dict(teacher_bytes=M.module_bytes(model.pformer_teacher), loss_align=float(loss),
                         grad_norm=float(grad.norm()), loss_nonfinite=not bool(torch.isfinite(loss)))
            if reference is not None:
                entry["loss_align_rel_change"] = float((loss - reference[0]).abs() / reference[0].abs())
                entry["grad_rel_change"] = float((grad - reference[1]).norm() / reference[1].norm())
            results[precision] = entry
            del grad
        reference = None
        for precision in results:
            model.pformer_teacher = load_teacher(teacher_path, precision, device)
            peak = M.peak_memory(step, device, before=lambda: step.optimizer.zero_grad(set_to_none=True))
            footprint = M.module_bytes(model) + M.optimizer_state_bytes(step.optimizer) + peak
            results[precision].update(step_peak_bytes=peak, footprint_bytes=footprint,
                                      footprint_ratio=footprint / stock_footprint)
    finally:
        model.pformer_teacher = own
        model.zero_grad(set_to_none=True)
    return results
