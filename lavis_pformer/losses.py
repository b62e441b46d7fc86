"""Losses shared by stage 0, stages 1/2 and video: alignment (MSE to the P-Former prompt), two-view
contrastive loss over the global batch, and the VQ commitment term toward the LLM input embeddings."""
import torch
import torch.nn.functional as F
from lavis.common.dist_utils import get_rank, get_world_size
from lavis.models.base_model import all_gather_with_grad, concat_all_gather
from torch import Tensor


def alignment_loss(pred: Tensor, target: Tensor, weight: float) -> Tensor:
    """weight * MSE(pred, sg(target)), mean over all elements; pred, target [B, Q, H_llm]."""
    if pred.shape != target.shape:
        raise ValueError(f"alignment_loss: prediction shape {tuple(pred.shape)} != P-Former prompt shape "
                         f"{tuple(target.shape)} (expected [B, Q, H_llm] for both: check num_query_token and "
                         f"the LLM width of the P-Former checkpoint)")
    return weight * F.mse_loss(pred.float(), target.detach().float())


def gather_with_grad(x: Tensor) -> Tensor:
    """[B, ...] per rank -> [world*B, ...] in rank order; the backward pass sends each rank the gradient of
    the sum of all ranks' losses w.r.t. its own part (DDP then averages). Identity with one process."""
    if get_world_size() == 1:
        return x
    # LAVIS's GatherLayer: all_gather forward; backward all_reduce(sum) of the grads, keep own slice.
    return all_gather_with_grad(x.contiguous())


def gather_without_grad(x: Tensor) -> Tensor:
    """[B, ...] per rank -> [world*B, ...] in rank order, detached (LAVIS's concat_all_gather with a group)."""
    if get_world_size() == 1:
        return x.detach()
    return concat_all_gather(x.contiguous())


def two_view_contrastive_loss(feat_a: Tensor, feat_b: Tensor, temperature, label_smoothing: float = 0.1,
                              key_grad: bool = False) -> Tensor:
    """Symmetric InfoNCE between two views [B, D] (normalised) of the same B sentences, negatives from the
    global batch of all ranks (each rank must hold the same B). Mean over local rows and both directions:

        (CE(a_i . b_all / t, i) + CE(b_i . a_all / t, i)) / 2, label-smoothed cross-entropy.

    ``key_grad=False`` (default): the gathered side (``b_all`` / ``a_all``, the columns) is a constant, so
    each feature gets gradient through its own rows only, as in the reference implementation's one-view
    loss and LAVIS's ITC; for two identical views the value and every gradient equal the reference's.
    ``key_grad=True``: gathered with gradient (``gather_with_grad``); for identical views that doubles the
    gradient of the features (the temperature's is unchanged)."""
    if feat_a.shape != feat_b.shape or feat_a.dim() != 2:
        raise ValueError(f"two_view_contrastive_loss: views must both be [B, D], got {tuple(feat_a.shape)} "
                         f"and {tuple(feat_b.shape)}")
    rank = get_rank()
    gather = gather_with_grad if key_grad else gather_without_grad
    a_all, b_all = gather(feat_a), gather(feat_b)
    targets = rank * feat_a.size(0) + torch.arange(feat_a.size(0), device=feat_a.device)
    logits_ab = feat_a.float() @ b_all.float().t() / temperature
    logits_ba = feat_b.float() @ a_all.float().t() / temperature
    return (F.cross_entropy(logits_ab, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_ba, targets, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def nearest_codebook_rows(x: Tensor, codebook: Tensor, chunk_size: int = 4096) -> Tensor:
    """x [N, H], codebook [V, H] (any float dtype) -> LongTensor [N] of the nearest rows (Euclidean).

    Uses ||E_j||^2 - 2 x.E_j (||x||^2 does not change the argmin) in fp32, chunk by chunk over V, keeping
    only a running min/argmin."""
    if x.dim() != 2 or codebook.dim() != 2 or x.size(1) != codebook.size(1):
        raise ValueError(f"nearest_codebook_rows: need x [N, H] and codebook [V, H], got {tuple(x.shape)} "
                         f"and {tuple(codebook.shape)}")
    xf = x.detach().float()
    best_val = torch.full((xf.size(0),), float("inf"), device=xf.device)
    best_idx = torch.zeros(xf.size(0), dtype=torch.long, device=xf.device)
    for start in range(0, codebook.size(0), chunk_size):
        rows = codebook[start:start + chunk_size].detach().to(device=xf.device, dtype=torch.float32)
        dist_chunk = (rows * rows).sum(1).unsqueeze(0) - 2.0 * (xf @ rows.t())  # [N, chunk]
        val, idx = dist_chunk.min(dim=1)
        better = val < best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


def vq_commitment_loss(prompt: Tensor, codebook: Tensor, chunk_size: int = 4096) -> Tensor:
    """MSE(prompt, sg(E[nearest row])); prompt [B, Q, H], codebook E [V, H] (frozen LLM input embeddings)."""
    if prompt.size(-1) != codebook.size(-1):
        raise ValueError(f"vq_commitment_loss: prompt width {prompt.size(-1)} != codebook width "
                         f"{codebook.size(-1)} (the P-Former's llm_hidden_size must equal the LLM's)")
    idx = nearest_codebook_rows(prompt.reshape(-1, prompt.size(-1)), codebook, chunk_size)
    target = codebook.detach()[idx.to(codebook.device)].to(prompt.device).view(prompt.shape)
    return F.mse_loss(prompt.float(), target.float())
