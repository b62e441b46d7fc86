"""One training step of stage 0 (``pformer_opt``) and stage 1 (``blip2_qformer_pformer``), for the
distributed-equivalence test (tests/test_distributed_equivalence.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_step.py --bert B --opt O --world W \\
        --pformer P --out results.pt

Every rank takes its block of a fixed global batch of 2 x B samples (rank r: samples r*B .. r*B+B-1, the
order in which LAVIS gathers features). Run in one process (``run_cases(..., world=1)``), the same code
takes all 2B samples. Dropout is off (p = 0) and stage 0 masks nothing (mask_prob 0), so that the forward
is a function of the samples alone; the frozen OPT (stage 0: ``llm_train_mode: False``, since OPT's dropout
is functional and ``_dropout_off`` cannot reach it) and ViT are in eval mode.

Per case it records, averaged over ranks as DDP and LAVIS's metric logger average them:
- ``loss``: each loss term;
- ``grad``: the gradient of each term alone w.r.t. every trainable parameter (``torch.autograd.grad`` on
  the plain module, then all_reduce / world size: what DDP does to the gradients);
- ``ddp_grad``: the gradient of the total loss through a DDP wrapper built as ``runner_pformer`` builds
  it (no device_ids on CPU).

Cases:
- ``stage0_equal``: 8 sentences chosen so that both ranks hold the same number of OPT tokens (LM loss is a
  mean over tokens per rank);
- ``stage0_natural``: 8 consecutive sentences of the corpus (unequal token counts);
- ``stage1_sampled``: stage 1 as LAVIS runs it (ITM hard negatives drawn with torch.multinomial);
- ``stage1_fixed_negatives``: ITM negatives fixed to the most similar non-matching sample (argmax
  instead of multinomial: the same choice whatever the split of the batch);
- ``stage1_natural``: as ``stage1_fixed_negatives`` on 8 consecutive captions (unequal token counts: ITG
  is a mean over tokens per rank);
- ``stage1_gather_with_grad``: as ``stage1_fixed_negatives``, with LAVIS's ``concat_all_gather`` of the
  ITC features replaced by a gather that keeps gradients (LAVIS detaches the gathered ITC columns, with
  any number of ranks, the 1-rank group of a single process included).
"""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from lavis_pformer.tiny import SIZES  # noqa: E402

B = 4  # samples per rank; the global batch is 2 * B
Q = 4
VIT = SIZES["vit"]


def _world():
    return dist.get_rank(), dist.get_world_size()


def _dropout_off(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@torch.no_grad()
def _spread(*modules):
    """Re-draw Linear / Embedding weights at unit-variance scale (std 1/sqrt(fan_in), embeddings std 1).

    At BERT's initial scale (std 0.02) the [CLS] / query features of different samples are nearly the
    same vector: contrastive losses sit at log(batch) and their gradients are mostly rounding noise, which
    would make any comparison of gradients meaningless. Spread features make the check sensitive.
    """
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.weight.normal_(0.0, sub.in_features ** -0.5)
            elif isinstance(sub, torch.nn.Embedding):
                sub.weight.normal_(0.0, 1.0)


def stage0_model(paths):
    from lavis.common.registry import registry

    cfg = OmegaConf.create(dict(
        bert_model=paths["bert"], opt_model=paths["opt"], llm_precision="fp32", num_query_token=Q,
        max_txt_len=24, embed_dim=16, mask_prob=0.0, load_pretrained=False, llm_train_mode=False,
    ))
    torch.manual_seed(0)
    model = registry.get_model_class("pformer_opt").from_config(cfg)
    _spread(model.pformer)
    return _dropout_off(model.train())


def stage1_model(paths, pformer):
    from lavis.common.registry import registry

    cfg = OmegaConf.create(dict(
        bert_model=paths["bert"], vit_model="custom_vit", vit_config=VIT, image_size=32, vit_precision="fp32",
        num_query_token=Q, cross_attention_freq=1, embed_dim=32, max_txt_len=24, load_pretrained=False,
        alignment_weight=10.0, pformer_checkpoint=pformer,
    ))
    torch.manual_seed(0)
    model = registry.get_model_class("blip2_qformer_pformer").from_config(cfg, for_training=True)
    _spread(model.Qformer, model.vision_proj, model.text_proj, model.itm_head, model.llm_proj)
    model.query_tokens.data.normal_(0.0, 1.0)
    return _dropout_off(model.train())


def _pairs_of_equal_length(texts, *length_fns, n=B):
    """2n texts: n pairs whose members have the same length under every length_fn; first members first."""
    by_length, firsts, seconds = {}, [], []
    for text in texts:
        key = tuple(fn(text) for fn in length_fns)
        if key in by_length:
            firsts.append(by_length.pop(key))
            seconds.append(text)
            if len(firsts) == n:
                return firsts + seconds
        else:
            by_length[key] = text
    raise ValueError("not enough sentences of equal length")


def stage0_batches(paths, model):
    sentences = [s.strip() for s in open(paths["sentences"]) if s.strip()]
    opt_len = lambda t: len(model.opt_tokenizer(t + "\n").input_ids)  # noqa: E731
    bert_len = lambda t: len(model.tokenizer(t).input_ids)  # noqa: E731
    return {
        "stage0_equal": {"text_input": _pairs_of_equal_length(sentences[100:], opt_len, bert_len)},
        "stage0_natural": {"text_input": sentences[:2 * B]},
    }


def stage1_batches(paths, model):
    captions = [r["caption"] for r in json.load(open(os.path.join(paths["world"], "captions_train.json")))]
    bert_len = lambda t: len(model.tokenizer(t, truncation=True, max_length=model.max_txt_len).input_ids)  # noqa: E731
    images = torch.randn(2 * B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "equal": {"image": images, "text_input": _pairs_of_equal_length(captions, bert_len)},
        "natural": {"image": images, "text_input": captions[:2 * B]},
    }


def local_block(batch):
    rank, world = _world()
    n = len(batch["text_input"]) // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def _mean_over_ranks(t):
    t = t.detach().clone()
    if _world()[1] > 1:
        dist.all_reduce(t)
        t /= _world()[1]
    return t


def one_step(model, samples, ddp):
    """Per-term losses and gradients (plain module) and the DDP gradient of the total loss."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(1234)
    out = model(samples)
    terms = sorted(k for k in out if k.startswith("loss_"))
    result = {"loss": {}, "grad": {}}
    for term in terms:
        grads = torch.autograd.grad(out[term], [p for _, p in params], retain_graph=True, allow_unused=True)
        result["loss"][term] = float(_mean_over_ranks(out[term]))
        result["grad"][term] = {n: _mean_over_ranks(g if g is not None else torch.zeros_like(p))
                                for (n, p), g in zip(params, grads)}
    result["loss"]["loss"] = float(_mean_over_ranks(out["loss"]))
    del out
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    ddp(samples)["loss"].backward()
    result["ddp_grad"] = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                          for n, p in params}
    model.zero_grad(set_to_none=True)
    return result


@contextlib.contextmanager
def fixed_itm_negatives():
    """torch.multinomial -> argmax: ITM takes the most similar non-matching sample as negative."""
    original = torch.multinomial
    torch.multinomial = lambda weights, num_samples, *a, **k: weights.argmax(-1, keepdim=True)
    try:
        yield
    finally:
        torch.multinomial = original


@contextlib.contextmanager
def itc_gather_with_grad():
    """LAVIS's Blip2Qformer gathers ITC features with concat_all_gather (no gradient): use a gather
    with gradient for float tensors (token ids and masks still go through concat_all_gather)."""
    import lavis.models.blip2_models.blip2_qformer as qformer_module
    from lavis.models.base_model import all_gather_with_grad

    original = qformer_module.concat_all_gather
    qformer_module.concat_all_gather = lambda t: all_gather_with_grad(t) if t.is_floating_point() else original(t)
    try:
        yield
    finally:
        qformer_module.concat_all_gather = original


def _wrap(model):
    if _world()[1] > 1:
        return DDP(model, device_ids=None, find_unused_parameters=False)  # as runner_pformer on CPU
    return model


def run_cases(paths, pformer):
    """All cases on the current process group (1 rank: the whole batch; 2 ranks: each its block)."""
    import lavis_pformer  # noqa: F401

    results = {}
    model = stage0_model(paths)
    ddp = _wrap(model)
    for case, batch in stage0_batches(paths, model).items():
        results[case] = one_step(model, local_block(batch), ddp)
    del ddp, model
    model = stage1_model(paths, pformer)
    ddp = _wrap(model)
    batches = {k: local_block(v) for k, v in stage1_batches(paths, model).items()}
    results["stage1_sampled"] = one_step(model, batches["equal"], ddp)
    with fixed_itm_negatives():
        results["stage1_fixed_negatives"] = one_step(model, batches["equal"], ddp)
        results["stage1_natural"] = one_step(model, batches["natural"], ddp)
        with itc_gather_with_grad():
            results["stage1_gather_with_grad"] = one_step(model, batches["equal"], ddp)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in ("bert", "opt", "world", "sentences", "pformer", "out"):
        parser.add_argument(f"--{key}", required=True)
    args = parser.parse_args(argv)
    from lavis_pformer.runtime import init_distributed

    init_distributed(OmegaConf.create({"device": "cpu"}))  # torchrun: gloo over env://
    results = run_cases(vars(args), args.pformer)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
