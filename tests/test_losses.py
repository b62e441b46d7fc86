"""Shared losses: alignment MSE, chunked VQ commitment, two-view contrastive (1 process and 2 gloo ranks)."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lavis_pformer.losses import (alignment_loss, gather_with_grad, nearest_codebook_rows,
                                  two_view_contrastive_loss, vq_commitment_loss)

from helpers import free_port


def test_alignment_loss_value_and_grads():
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 8, requires_grad=True)
    target = torch.randn(2, 5, 8, requires_grad=True)
    loss = alignment_loss(pred, target, 10.0)
    torch.testing.assert_close(loss, 10.0 * ((pred - target) ** 2).mean())
    loss.backward()
    torch.testing.assert_close(pred.grad, 10.0 * 2 * (pred - target).detach() / pred.numel())
    assert target.grad is None


def test_alignment_loss_shape_mismatch():
    with pytest.raises(ValueError, match="num_query_token"):
        alignment_loss(torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), 1.0)


@pytest.mark.parametrize("v, chunk, dtype", [(1000, 4096, torch.float32), (1000, 64, torch.float32),
                                             (997, 100, torch.float32), (513, 128, torch.float16)])
def test_nearest_codebook_rows_matches_cdist(v, chunk, dtype):
    g = torch.Generator().manual_seed(v + chunk)
    codebook = torch.randn(v, 16, generator=g).to(dtype)
    x = torch.randn(300, 16, generator=g)
    x[:10] = codebook[torch.arange(10) * 37].float() + 0.01  # some exact-ish hits
    expected = torch.cdist(x, codebook.float(), compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert torch.equal(nearest_codebook_rows(x, codebook, chunk), expected)


def test_vq_commitment_loss_grad():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 8, generator=g).half().requires_grad_(True)
    prompt = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    loss = vq_commitment_loss(prompt, codebook, chunk_size=16)
    idx = torch.cdist(prompt.detach().reshape(-1, 8), codebook.detach().float()).argmin(1)
    nearest = codebook.detach().float()[idx].view(3, 4, 8)
    torch.testing.assert_close(loss, ((prompt - nearest) ** 2).mean())
    loss.backward()
    torch.testing.assert_close(prompt.grad, 2 * (prompt - nearest).detach() / prompt.numel())
    assert codebook.grad is None


def test_gather_with_grad_single_process_is_identity():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def _by_hand(a, b, t, eps):
    """Label-smoothed symmetric InfoNCE written out with explicit log-softmax."""
    def direction(x, y):
        logp = (x @ y.t() / t).log_softmax(dim=1)
        n = logp.size(1)
        rows = [-(1 - eps) * logp[i, i] - eps * logp[i].sum() / n for i in range(x.size(0))]
        return torch.stack(rows).mean()
    return (direction(a, b) + direction(b, a)) / 2


def test_contrastive_single_process_matches_hand_computation():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    t = torch.tensor(0.07)
    torch.testing.assert_close(two_view_contrastive_loss(a, b, t), _by_hand(a, b, t, 0.1))
    torch.testing.assert_close(two_view_contrastive_loss(a, b, 0.5, label_smoothing=0.0), _by_hand(a, b, 0.5, 0.0))
    with pytest.raises(ValueError):
        two_view_contrastive_loss(a, b[:5], t)


def _reference_gradients(f, t, eps):
    """Gradients of the reference's one-view loss mean_i CE(f_i . sg(f_j) / t, label i, smoothing eps), by hand:
    with p_ij = softmax_j(f_i . f_j / t) and y_ij = (1 - eps) [i == j] + eps / B,
    dL/df_i = sum_j (p_ij - y_ij) f_j / (B t) (columns constant) and dL/dt = -sum_ij (p_ij - y_ij) f_i . f_j / (B t^2)."""
    b = f.size(0)
    sim = f @ f.t()
    residual = (sim / t).softmax(dim=1) - ((1 - eps) * torch.eye(b) + eps / b)
    return residual @ f / (b * t), -(residual * sim).sum() / (b * t * t), residual


@pytest.mark.parametrize("t_value", [0.07, 0.5])
def test_contrastive_identical_views_reproduce_the_reference_gradient(t_value):
    """Default (gradient through the rows only): two identical views give the reference's one-view loss and
    exactly its gradients; with the gathered side differentiated too (key_grad) the feature gradient becomes
    rows + columns, about twice as large."""
    g = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(12, 8, generator=g), dim=-1).requires_grad_()
    t = torch.tensor(t_value, requires_grad=True)
    want_f, want_t, residual = _reference_gradients(f.detach(), t.detach(), 0.1)

    loss = two_view_contrastive_loss(f, f, t)
    torch.testing.assert_close(loss, _by_hand(f.detach(), f.detach(), t.detach(), 0.1))
    got_f, got_t = torch.autograd.grad(loss, (f, t))
    torch.testing.assert_close(got_f, want_f, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-7)

    both = two_view_contrastive_loss(f, f, t, key_grad=True)
    got_f, got_t = torch.autograd.grad(both, (f, t))
    b = f.size(0)
    torch.testing.assert_close(got_f, (residual + residual.t()) @ f.detach() / (b * t.detach()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-7)
    if t_value == 0.07:  # the self-similarity dominates every row: p is almost symmetric, the ratio almost 2
        ratio = (got_f.norm() / want_f.norm()).item()
        assert 1.9 < ratio < 2.1, ratio


GLOBAL_B, D, WORLD = 8, 6, 2


def _problem():
    """Fixed global batch: inputs of two views [2B', D], a shared projection and a temperature (replicated)."""
    g = torch.Generator().manual_seed(123)
    xa, xb = torch.randn(GLOBAL_B, D, generator=g), torch.randn(GLOBAL_B, D, generator=g)
    proj, temp = torch.randn(D, D, generator=g), torch.tensor(0.1)
    return xa, xb, proj, temp


def _step(xa, xb, proj, temp, key_grad):
    """Loss of one step; leaves (inputs, proj, temp) get grads."""
    return two_view_contrastive_loss(F.normalize(xa @ proj, dim=-1), F.normalize(xb @ proj, dim=-1), temp,
                                     key_grad=key_grad)


def _worker(rank, port, out_dir, key_grad):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it hangs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        xa, xb, proj, temp = _problem()
        local = slice(rank * GLOBAL_B // WORLD, (rank + 1) * GLOBAL_B // WORLD)
        xa, xb = xa[local].clone().requires_grad_(), xb[local].clone().requires_grad_()
        proj, temp = proj.requires_grad_(), temp.requires_grad_()
        loss = _step(xa, xb, proj, temp, key_grad)
        loss.backward()
        for p in (proj, temp):  # what DDP does to replicated parameters
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        torch.save({"loss": loss.detach(), "xa": xa.grad / WORLD, "xb": xb.grad / WORLD,
                    "proj": proj.grad, "temp": temp.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("key_grad", [False, True])
def test_contrastive_two_ranks_equals_one_process_on_full_batch(tmp_path, key_grad):
    # fork: the children inherit the imported modules (spawn would re-import torch and LAVIS, ~10 s each)
    ctx = mp.start_processes(_worker, args=(free_port(), str(tmp_path), key_grad), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2 gloo ranks did not finish within 60 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    xa, xb, proj, temp = (t.requires_grad_() for t in _problem())
    loss = _step(xa, xb, proj, temp, key_grad)
    loss.backward()

    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), atol=1e-6, rtol=0)
    # input grads: each rank's local grad is d(sum of ranks' losses)/d(own part); DDP's mean divides by WORLD
    torch.testing.assert_close(torch.cat([r["xa"] for r in ranks]), xa.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([r["xb"] for r in ranks]), xb.grad, atol=1e-6, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["proj"], proj.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(r["temp"], temp.grad, atol=1e-6, rtol=1e-6)  # |grad| ~ 1e2: fp32 rounding
