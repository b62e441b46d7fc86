"""model.teacher_precision: the frozen P-Former teacher of stages 1 and 2 in fp32, fp16 or bf16.

- a half-precision teacher holds half the bytes, and gives a ``loss_align`` and a gradient of it within about a
  percent of the fp32 teacher's on the same batch (tiny backbones; the paper-size figures are in docs/cluster.md);
- the training tasks choose the default by ``run.device`` (fp16 on cuda, fp32 on the CPU); a given value wins;
- the P-Former file stays fp32 and the teacher stays out of the stage checkpoints;
- an unknown value is a configuration error naming the key.
"""
import types

import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401  (registers models and tasks)
from lavis.common.registry import registry
from lavis_pformer.errors import ConfigError
from lavis_pformer.pformer import PFormer
from lavis_pformer.tasks import ImageTextPretrainPFormerTask
from lavis_pformer.tiny import SIZES

from helpers import make_teacher

pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a dog", "a cat sitting next to a tree"]
PROJ = {"blip2_qformer_pformer": "llm_proj", "blip2_opt_pformer": "opt_proj"}


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    return make_teacher(tiny, tmp_path_factory.mktemp("teacher") / "pformer.pth")


def model_cfg(tiny, teacher, arch="blip2_opt_pformer", **overrides):
    cfg = dict(arch=arch, bert_model=tiny["bert"], vit_model="custom_vit", vit_config=SIZES["vit"], image_size=32,
               vit_precision="fp32", llm_precision="fp32", num_query_token=4, max_txt_len=24, load_pretrained=False,
               pformer_checkpoint=teacher)
    cfg.update(overrides)
    if arch == "blip2_opt_pformer":
        cfg["opt_model"] = tiny["opt"]
    return OmegaConf.create(cfg)


def build(tiny, teacher, arch="blip2_opt_pformer", **overrides):
    torch.manual_seed(0)
    return registry.get_model_class(arch).from_config(model_cfg(tiny, teacher, arch, **overrides), for_training=True)


def align_loss_and_grad(model):
    """loss_align and its gradient on every trainable tensor, on a fixed batch (same dropout draws)."""
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    samples = {"image": torch.rand(4, 3, 32, 32, generator=g), "text_input": CAPTIONS}
    torch.manual_seed(0)
    loss = model(samples)["loss_align"]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten() for gr, p in zip(grads, params)])
    return loss.detach(), flat


@pytest.mark.parametrize("arch", sorted(PROJ))
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_teacher_halves_its_bytes_and_keeps_loss_align_and_its_gradient(tiny, teacher, arch, precision):
    fp32, half = build(tiny, teacher, arch), build(tiny, teacher, arch, teacher_precision=precision)
    assert {p.dtype for p in half.pformer_teacher.parameters()} == {DTYPES[precision]}
    assert {p.dtype for p in fp32.pformer_teacher.parameters()} == {torch.float32}
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.pformer_teacher.parameters())  # noqa: E731
    assert nbytes(half) * 2 == nbytes(fp32)
    assert half.teacher_prompt(CAPTIONS).dtype == DTYPES[precision]
    loss32, grad32 = align_loss_and_grad(fp32)
    loss, grad = align_loss_and_grad(half)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert abs(loss - loss32) / loss32 < 0.01, (float(loss), float(loss32))
    assert (grad - grad32).norm() / grad32.norm() < 0.02
    # the rest of the model is untouched: the trainable side and the other frozen parts keep their dtypes
    assert getattr(half, PROJ[arch]).weight.dtype == torch.float32 and half.query_tokens.dtype == torch.float32


def test_half_teacher_leaves_fp32_backbones_out_of_autocast_on_the_cpu(tiny, teacher):
    """LAVIS's maybe_autocast sections run under CPU autocast only when a backbone (ViT, LLM) is in half precision;
    the teacher's own precision does not count (it would run the fp32 ViT and LLM in fp16)."""
    for llm_precision, expected in (("fp32", False), ("fp16", True)):
        model = build(tiny, teacher, teacher_precision="bf16", llm_precision=llm_precision)
        with model.maybe_autocast():
            assert torch.is_autocast_enabled("cpu") is expected, llm_precision


def test_half_teacher_stays_out_of_checkpoints_and_its_file_stays_fp32(tiny, teacher, tmp_path):
    model = build(tiny, teacher, teacher_precision="fp16")
    assert not [k for k in model.state_dict() if k.startswith("pformer_teacher.")]
    original = torch.load(teacher, weights_only=True)["state_dict"]
    assert {v.dtype for v in original.values() if v.is_floating_point()} == {torch.float32}  # the file is untouched
    model.pformer_teacher.save(str(tmp_path / "again.pth"))
    written = torch.load(tmp_path / "again.pth", weights_only=True)["state_dict"]
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.float32}
    for key, value in written.items():  # the fp16 values, written back as fp32
        expected = original[key].half().float() if value.is_floating_point() else original[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    reloaded = PFormer.load(str(tmp_path / "again.pth"))
    assert next(reloaded.parameters()).dtype == torch.float32


def task_built_model(tiny, teacher, device, evaluate=False, **overrides):
    cfg = types.SimpleNamespace(model_cfg=model_cfg(tiny, teacher, **overrides),
                                run_cfg=OmegaConf.create({"device": device, "evaluate": evaluate}))
    torch.manual_seed(0)
    return ImageTextPretrainPFormerTask().build_model(cfg), cfg


@pytest.mark.parametrize("device, given, expected", [
    ("cpu", None, "fp32"), ("cuda", None, "fp16"), ("cuda:1", None, "fp16"), ("cuda", "fp32", "fp32"),
    ("cpu", "bf16", "bf16"),
])
def test_training_task_chooses_the_teacher_precision_by_device(tiny, teacher, device, given, expected):
    """The model is built on the CPU either way (the runner moves it): only the choice depends on run.device."""
    model, cfg = task_built_model(tiny, teacher, device, **({} if given is None else {"teacher_precision": given}))
    assert next(model.pformer_teacher.parameters()).dtype == DTYPES[expected]
    assert cfg.model_cfg.teacher_precision == expected  # printed with the run's config


def test_evaluation_builds_no_teacher_whatever_the_device(tiny, teacher):
    model, cfg = task_built_model(tiny, teacher, "cuda", evaluate=True)
    assert model.pformer_teacher is None and "teacher_precision" not in cfg.model_cfg


@pytest.mark.parametrize("value", ["half", "float16", 16])
def test_unknown_teacher_precision_is_a_config_error(tiny, teacher, value):
    with pytest.raises(ConfigError, match=r"model\.teacher_precision must be one of bf16, fp16, fp32"):
        build(tiny, teacher, teacher_precision=value)
