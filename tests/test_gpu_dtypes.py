"""GPU precisions checked on the CPU: stage-1 and stage-2 training steps with the ViT in fp16 and the LLM in fp16
or bf16, under CPU autocast where LAVIS uses CUDA autocast (its ``maybe_autocast`` sections and the runner's
``run.amp``), and generation under ``maybe_autocast`` alone (as evaluation runs).

What is asserted: finite losses (every term), gradients that reach the Q-Former, its query tokens and the projection
(finite, non-zero), an AdamW step that changes them, and frozen backbones that keep their precision and get no
gradient. The end-to-end case runs train.py with ``run.amp: True`` on the CPU.
"""
import math
import types

import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401
from lavis.common.registry import registry
from lavis_pformer.precision import cpu_autocast
from lavis_pformer.tiny import SIZES

from helpers import build_model, make_teacher, only_run_dir, run_script, stage2_config, tiny_stage0_overrides

VIT = SIZES["vit"]
CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a dog", "a cat sitting next to a tree"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)
LLM_KEY = {"blip2_opt_pformer": "opt_model", "blip2_t5_pformer": "t5_model"}
PROJ = {"blip2_qformer_pformer": "llm_proj", "blip2_opt_pformer": "opt_proj", "blip2_t5_pformer": "t5_proj"}


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {llm: make_teacher(tiny, root / f"pformer_{llm}.pth", llm) for llm in ("opt", "t5")}


def build(tiny, teachers, name, llm_precision, for_training=True):
    cfg = dict(bert_model=tiny["bert"], vit_model="custom_vit", vit_config=dict(VIT, checkpoint=tiny["vit"]),
               image_size=32, vit_precision="fp16", num_query_token=4, max_txt_len=24, load_pretrained=False)
    if name == "blip2_qformer_pformer":
        cfg.update(embed_dim=16, cross_attention_freq=1, pformer_checkpoint=teachers["opt"])
    else:
        llm = "opt" if name == "blip2_opt_pformer" else "t5"
        cfg.update({LLM_KEY[name]: tiny[llm], "llm_precision": llm_precision, "pformer_checkpoint": teachers[llm]})
    torch.manual_seed(0)
    return registry.get_model_class(name).from_config(OmegaConf.create(cfg), for_training=for_training)


def samples(b=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 3, 32, 32, generator=g), "text_input": list(CAPTIONS[:b])}


CASES = [("blip2_qformer_pformer", None), ("blip2_opt_pformer", "fp16"), ("blip2_opt_pformer", "bf16"),
         ("blip2_t5_pformer", "fp16"), ("blip2_t5_pformer", "bf16")]


@pytest.mark.parametrize("name,llm_precision", CASES)
def test_training_step_in_gpu_precisions(tiny, teachers, name, llm_precision):
    model = build(tiny, teachers, name, llm_precision)
    model.train()
    assert model.visual_encoder.patch_embed.proj.weight.dtype == torch.float16
    if llm_precision:
        llm = getattr(model, LLM_KEY[name])
        assert {p.dtype for p in llm.parameters()} == {DTYPES[llm_precision]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    with cpu_autocast(torch.float16):  # the runner's run.amp (LAVIS: torch.cuda.amp.autocast)
        output = model(samples())
    losses = {k: float(v) for k, v in output.items() if k.startswith("loss")}
    assert "loss_align" in losses and all(math.isfinite(v) for v in losses.values()), losses
    assert ("loss_itc" in losses) == (name == "blip2_qformer_pformer") and ("loss_lm" in losses)
    output["loss"].backward()
    qformer = [n for n in trainable if n.startswith("Qformer.")]
    for group in (qformer, ["query_tokens"], [n for n in trainable if n.startswith(PROJ[name] + ".")]):
        grads = [trainable[n].grad for n in group]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), group[:3]
        assert sum(float(g.float().norm()) for g in grads) > 0, group[:3]
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    optimizer.step()
    changed = [n for n in qformer + ["query_tokens"] if not torch.equal(before[n], trainable[n].detach())]
    assert len(changed) > len(qformer) // 2, len(changed)


@pytest.mark.parametrize("name,llm_precision", [("blip2_opt_pformer", "fp16"), ("blip2_t5_pformer", "bf16")])
def test_generation_in_gpu_precisions_under_maybe_autocast_alone(tiny, teachers, name, llm_precision):
    """Evaluation runs no run.amp: only LAVIS's maybe_autocast sections, which do nothing on a CPU in LAVIS."""
    model = build(tiny, teachers, name, llm_precision, for_training=False).eval()
    captions = model.generate(samples(2), num_beams=2, max_length=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_fp16_vit_training_without_amp_is_refused_early():
    from lavis_pformer.cli import check_vit_precision
    from lavis_pformer.errors import ConfigError

    cfg = types.SimpleNamespace(model_cfg=OmegaConf.create({"vit_model": "eva_clip_g", "vit_precision": "fp16"}),
                                run_cfg=OmegaConf.create({"amp": False}))
    with pytest.raises(ConfigError, match="run.amp: True"):
        check_vit_precision(cfg)
    for run in ({"amp": True}, {"amp": False, "evaluate": True}):
        check_vit_precision(types.SimpleNamespace(model_cfg=cfg.model_cfg, run_cfg=OmegaConf.create(run)))
    check_vit_precision(types.SimpleNamespace(model_cfg=OmegaConf.create({"vit_model": "eva_clip_g",
                                                                          "vit_precision": "fp32"}),
                                              run_cfg=cfg.run_cfg))


def test_train_py_with_gpu_precisions_and_amp_on_the_cpu(tiny, teachers, tmp_path):
    """train.py, stage 2 (OPT in bf16, ViT in fp16), run.amp True on the CPU: the steps run under CPU autocast."""
    cfg = stage2_config(tiny, teachers["opt"], "out", amp=True, batch_size_train=16)
    cfg["model"].update(vit_precision="fp16", llm_precision="bf16")
    proc = run_script("train.py", cfg, str(tmp_path))
    assert "training steps run under CPU autocast" in proc.stderr
    run_dir = only_run_dir(tmp_path / "out")
    import json

    stats = [json.loads(line) for line in open(f"{run_dir}/log.txt") if line.startswith('{"train_')]
    assert stats and all(math.isfinite(float(stats[-1][k])) for k in ("train_loss", "train_loss_lm", "train_loss_align"))


@pytest.mark.parametrize("name,llm_precision", [("pformer_opt", "fp16"), ("pformer_opt", "bf16"),
                                                ("pformer_t5", "fp16"), ("pformer_t5", "bf16")])
def test_stage0_training_step_in_gpu_precisions(tiny, name, llm_precision):
    """Stage 0 under the runner's run.amp with the LLM in fp16 or bf16 (the paper's Flan-T5 config: bf16 T5, amp):
    the prompt meets the LLM's token embeddings in a concatenation that autocast would refuse for fp16 + bf16."""
    llm = "opt" if name == "pformer_opt" else "t5"
    torch.manual_seed(0)
    overrides = {**tiny_stage0_overrides(tiny, llm), "llm_precision": llm_precision}
    model = build_model(name, "tiny", **overrides).train()
    assert {p.dtype for p in model.llm_module().parameters()} == {DTYPES[llm_precision]}
    with cpu_autocast(torch.float16):
        output = model({"text_input": CAPTIONS})
    losses = {k: float(v) for k, v in output.items() if k.startswith("loss")}
    assert "loss_lm" in losses and all(math.isfinite(v) for v in losses.values()), losses
    output["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().norm()) for g in grads) > 0
