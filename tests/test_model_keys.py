"""Each model's ``from_config`` reads and checks its keys once, at its top (lavis_pformer/model_keys.py): no module
below it holds the config, and a wrong key fails before any backbone is built."""
import sys

import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401
from lavis.common.registry import registry
from lavis_pformer.backbones import BackboneMixin
from lavis_pformer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)

# arch -> the module of its from_config
FROM_CONFIG = {
    "pformer_opt": "lavis_pformer.models.pformer_pretrain",
    "blip2_qformer_pformer": "lavis_pformer.models.blip2_qformer_pformer",
    "blip2_opt_pformer": "lavis_pformer.models.stage2",
    "blip2_t5_pformer": "lavis_pformer.models.stage2",
    "video_opt_pformer": "lavis_pformer.models.video_opt_pformer",
}


def tiny_cfg(tiny, arch, **overrides):
    """The arch's ``tiny`` model type on the session's tiny backbones, from the backbones alone."""
    cfg = OmegaConf.load(registry.get_model_class(arch).default_config_path("tiny")).model
    for key in ("bert_model", "opt_model", "t5_model"):
        if key in cfg:
            cfg[key] = tiny[key.split("_")[0]]
    if "vit_config" in cfg:
        cfg.vit_config.checkpoint = tiny["vit"]
    return OmegaConf.merge(cfg, {"load_pretrained": False}, overrides)


def modules_holding(cfg, build):
    """The lavis_pformer modules whose functions hold ``cfg`` itself while ``build()`` runs."""
    seen = set()

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("lavis_pformer") and any(v is cfg for v in frame.f_locals.values()):
            seen.add(module)

    sys.setprofile(profile)
    try:
        model = build()
    finally:
        sys.setprofile(None)
    return seen, model


def test_no_module_below_from_config_holds_the_config(tiny, tmp_path):
    torch.manual_seed(0)
    for arch in FROM_CONFIG:
        cfg = tiny_cfg(tiny, arch)
        seen, model = modules_holding(cfg, lambda: registry.get_model_class(arch).from_config(cfg))
        assert seen == {FROM_CONFIG[arch], "lavis_pformer.model_keys"}, arch
        if arch == "blip2_qformer_pformer":
            stage1, query_tokens = str(tmp_path / "stage1.pth"), model.query_tokens.detach().clone()
            torch.save({"model": model.state_dict()}, stage1)
    # a stage-2 model that starts from a stage-1 checkpoint: the checkpoint is loaded from what from_config read
    cfg = tiny_cfg(tiny, "blip2_opt_pformer", load_pretrained=True, pretrained=stage1, alignment_weight=0)
    seen, model = modules_holding(cfg, lambda: registry.get_model_class("blip2_opt_pformer").from_config(cfg))
    assert seen == {"lavis_pformer.models.stage2", "lavis_pformer.model_keys"}
    assert torch.equal(model.query_tokens, query_tokens)  # loaded from the stage-1 checkpoint


BAD_KEYS = [
    ("pformer_opt", {"llm_precision": "fp8"}, "model.llm_precision must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
    ("blip2_opt_pformer", {"llm_precision": "fp8"}, "model.llm_precision must be one of"),
    ("blip2_t5_pformer", {"llm_precision": "fp8"}, "model.llm_precision must be one of"),
    ("video_opt_pformer", {"llm_precision": "fp8"}, "model.llm_precision must be one of"),
    ("blip2_qformer_pformer", {"load_pretrained": True, "pretrained": ""}, "model.pretrained is empty"),
    ("blip2_opt_pformer", {"load_finetuned": True, "finetuned": ""},
     "model.load_finetuned is True but model.finetuned is empty"),
    ("pformer_opt", {"load_pretrained": True, "pretrained": ""}, "model.pretrained is empty"),
]


@pytest.mark.parametrize("arch, overrides, message", BAD_KEYS,
                         ids=[f"{a}-{'-'.join(o)}" for a, o, _ in BAD_KEYS])
def test_a_wrong_key_fails_before_any_backbone_is_built(tiny, monkeypatch, arch, overrides, message):
    def building(*args, **kwargs):
        raise AssertionError("a backbone is being built")

    monkeypatch.setattr(BackboneMixin, "set_backbones", building)  # the first thing every constructor does
    with pytest.raises(ConfigError) as error:
        registry.get_model_class(arch).from_config(tiny_cfg(tiny, arch, **overrides))
    assert message in str(error.value)
