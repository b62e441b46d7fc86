"""The pair the training-step benchmark compares, and one training step of either at a step precision.

The pair: the plugin's stage-1/2 model (with its frozen P-Former teacher) and LAVIS's own class with the same
weights, sharing one frozen ViT and one LLM object. The step precisions:

- ``fp32``: no autocast, an fp32 LLM;
- ``fp16``: fp16 autocast + GradScaler, as LAVIS's runner with ``run.amp: True``; the LLM in LAVIS's precision
  (OPT fp16, T5 bf16: ``Blip2T5`` casts it so);
- ``bf16``: bf16 autocast, no GradScaler, a bf16 LLM (LAVIS concatenates the prompt with the LLM's token
  embeddings, and autocast refuses an fp16 / bf16 mix there).

On a CPU the autocast is the plugin's ``cpu_autocast`` (what its tasks use for ``run.amp`` there) and the
GradScaler is ``torch.amp.GradScaler("cpu")``: slow, but the same code path as on a GPU.
"""
import contextlib

import torch

import model_factories as MF
from lavis_pformer.precision import LOW_PRECISION, cpu_autocast

STAGES = {
    "2": dict(name="stage 2", ours="blip2_opt_pformer", weight=100.0, lavis="Blip2OPT", llm="opt_model",
              proj="opt_proj"),
    "1": dict(name="stage 1", ours="blip2_qformer_pformer", weight=10.0, lavis="Blip2Qformer", llm=None, proj=None),
    "2t5": dict(name="stage 2 (Flan-T5)", ours="blip2_t5_pformer", weight=100.0, lavis="Blip2T5", llm="t5_model",
                proj="t5_proj"),
}
STEP_PRECISIONS = {
    "fp32": dict(autocast=None, scaler=False),
    "fp16": dict(autocast=torch.float16, scaler=True),
    "bf16": dict(autocast=torch.bfloat16, scaler=False),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def build_pair(stage, sizes, teacher, teacher_precision="fp32"):
    """(plugin model with teacher, stock LAVIS model with the same weights, extra trainable names), on CPU."""
    spec = STAGES[stage]
    common = dict(alignment_weight=spec["weight"], pformer_checkpoint=teacher, teacher_precision=teacher_precision)
    if stage == "2":
        from lavis.models.blip2_models.blip2_opt import Blip2OPT as lavis_cls

        cfg = MF.model_cfg(sizes, **common)
        extra = dict(opt_model=sizes["opt"])
    elif stage == "2t5":
        from lavis.models.blip2_models.blip2_t5 import Blip2T5 as lavis_cls

        cfg = MF.model_cfg(sizes, opt_model=None, t5_model=sizes["t5"], **common)
        extra = dict(t5_model=sizes["t5"])
    else:
        from lavis.models.blip2_models.blip2_qformer import Blip2Qformer as lavis_cls

        cfg = MF.model_cfg(sizes, opt_model=None, cross_attention_freq=2, embed_dim=256, **common)
        extra = dict(cross_attention_freq=2, embed_dim=256)
    torch.manual_seed(0)
    ours = MF.build_registered(spec["ours"], cfg, for_training=True)
    assert ours.pformer_teacher is not None and ours.alignment_weight == spec["weight"]
    torch.manual_seed(1)
    stock = MF.stock_model(lavis_cls, sizes, visual_encoder=ours.visual_encoder, **extra)
    weights = {k: v for k, v in ours.state_dict().items() if k != "_extra_state"}  # not the plugin's stage record
    msg = stock.load_state_dict(weights, strict=False)
    if stage == "2":
        stock.opt_model = ours.opt_model  # the same frozen LLM object (one copy in memory)
        assert not msg.unexpected_keys, msg.unexpected_keys
    elif stage == "2t5":
        # The same frozen T5 object; LAVIS's Blip2T5 constructor cast it to bf16 in place: back to llm_precision.
        ours.t5_model = ours.cast_llm(ours.t5_model, sizes["llm_precision"])
        stock.t5_model = ours.t5_model
        assert not msg.unexpected_keys, msg.unexpected_keys
    else:
        assert sorted(msg.unexpected_keys) == ["llm_proj.bias", "llm_proj.weight"], msg.unexpected_keys
    ours_params = dict(ours.named_parameters())
    for name, p in stock.named_parameters():
        if p is not ours_params[name]:  # shared frozen backbones are the same tensors
            assert torch.equal(p.detach().cpu().float(), ours_params[name].detach().cpu().float()), name
    trainable_ours = {n for n, p in ours.named_parameters() if p.requires_grad}
    trainable_stock = {n for n, p in stock.named_parameters() if p.requires_grad}
    assert trainable_stock <= trainable_ours, sorted(trainable_stock - trainable_ours)
    return ours, stock, sorted(trainable_ours - trainable_stock)


def llm_precision(stage, step_precision):
    """The frozen LLM's precision under a step precision (see the module docstring); None: no LLM (stage 1)."""
    if STAGES[stage]["llm"] is None:
        return None
    if step_precision == "fp16":
        return "bf16" if stage == "2t5" else "fp16"
    return step_precision


def set_llm_precision(ours, stage, step_precision):
    """Cast the shared frozen LLM in place; returns its precision (None for stage 1)."""
    precision = llm_precision(stage, step_precision)
    if precision is not None:
        getattr(ours, STAGES[stage]["llm"]).to(DTYPES[precision])
    return precision


def step_autocast(precision, device):
    dtype = STEP_PRECISIONS[precision]["autocast"]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return cpu_autocast(dtype) if device_type == "cpu" else torch.autocast(device_type, dtype=dtype)


class TrainStep:
    """One training step of ``model`` on ``samples``: zero_grad, forward under the precision's autocast,
    backward, AdamW step (through a GradScaler under fp16). Keeps every loss it returned (``losses``)."""

    def __init__(self, model, samples, precision, device):
        self.model, self.samples, self.precision, self.device = model, samples, precision, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                           weight_decay=0.05)
        scaled = STEP_PRECISIONS[precision]["scaler"]
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if scaled else None
        self.losses, self.skipped = [], 0

    def __call__(self):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with step_autocast(self.precision, self.device):
            loss = self.model(self.samples)["loss"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += self.scaler.get_scale() < scale  # the scale drops only after inf / nan gradients
        else:
            loss.backward()
            self.optimizer.step()
        self.losses.append(loss.detach())
        return loss

    def health(self):
        """{"steps", "nonfinite_losses", "last_loss", "skipped_steps", "grad_scale", "adamw_state_empty"}: the
        GradScaler skips a step whose gradients overflowed (and halves its scale); while every step so far was
        skipped AdamW holds no state yet, and a footprint then lacks it."""
        losses = torch.stack([loss.float().cpu() for loss in self.losses])
        return dict(steps=len(self.losses), nonfinite_losses=int((~torch.isfinite(losses)).sum()),
                    last_loss=float(losses[-1]), skipped_steps=self.skipped,
                    grad_scale=None if self.scaler is None else float(self.scaler.get_scale()),
                    adamw_state_empty=not self.optimizer.state)


def prompt_in_fp32(_module, _inputs, prompt):
    return prompt.float() if prompt.dtype in LOW_PRECISION else None


def make_stock_run(stage, stock, step):
    """Run the stock step once (untimed). LAVIS's ``Blip2T5`` fails under fp16 autocast: it concatenates an
    fp16 prompt with its bf16 T5's token embeddings under bf16 autocast ("Unexpected floating ScalarType in
    at::autocast::prioritize"). Then its projection hands the prompt in fp32, as the plugin's stage-2 models
    do (``Stage2Mixin.setup_prompt_dtype``), so that the pair is still compared; returns the note recorded
    with the results (None when the stock model ran as it is)."""
    try:
        step()
        return None
    except RuntimeError as e:
        proj = STAGES[stage]["proj"]
        if "prioritize" not in str(e) or proj is None:
            raise
        getattr(stock, proj).register_forward_hook(prompt_in_fp32)
        step()
        return (f"LAVIS's {STAGES[stage]['lavis']} failed under {step.precision} autocast "
                f"({' '.join(str(e).split())[:160]}); measured with its {proj} output handed on in fp32, "
                "as the plugin's stage-2 models do")
