"""LAVIS's eva_clip_g / clip_L from a local weights file, offline, without any network attempt (issue: compute nodes
are often offline).

LAVIS's constructors have fixed sizes (eva_clip_g: 39 blocks of width 1408); here they are built at a small size by
shrinking LAVIS's own ViT classes for the test (same classes, same tensor names as eva_vit_g.pth / clip_vit_L.pth),
so the plugin's code path is the real one: LAVIS's create_eva_vit_g / create_clip_vit_L with the weights read from
``model.vit_config.checkpoint``. Every socket connection and LAVIS's download function fail the test if touched.
"""
import socket

import pytest
import torch
from omegaconf import OmegaConf

import lavis.common.dist_utils as dist_utils
import lavis.models.clip_vit as clip_vit
import lavis.models.eva_vit as eva_vit
import lavis_pformer  # noqa: F401
from lavis.common.registry import registry
from lavis_pformer.errors import CheckpointError, ConfigError, MissingFileError

SMALL = {"eva_clip_g": dict(embed_dim=32, depth=1, num_heads=4), "clip_L": dict(width=32, layers=1, heads=4)}
IMAGE = 28  # patch 14: 2 x 2 patches
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Offline, and any network attempt (a socket connection or LAVIS's download) raises NetworkAttempt."""
    def refuse(*args, **kwargs):
        raise NetworkAttempt(f"network attempt: {args[:2]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(dist_utils, "download_cached_file", refuse)
    for module in (eva_vit, clip_vit):
        monkeypatch.setattr(module, "download_cached_file", refuse)


@pytest.fixture
def small_lavis_vits(monkeypatch):
    """LAVIS's ViT classes at a small size (create_eva_vit_g / create_clip_vit_L pass their fixed sizes)."""
    for module, name in ((eva_vit, "eva_clip_g"), (clip_vit, "clip_L")):
        cls = module.VisionTransformer
        small = type(f"Small{cls.__name__}", (cls,), {
            "__init__": lambda self, *a, _cls=cls, _size=SMALL[name], **k: _cls.__init__(self, *a, **{**k, **_size})})
        monkeypatch.setattr(module, "VisionTransformer", small)


def save_small_vit(name, path, seed=3):
    """The small ViT's weights, saved as LAVIS's files are: a flat state dict."""
    torch.manual_seed(seed)
    if name == "eva_clip_g":
        vit = eva_vit.VisionTransformer(img_size=IMAGE, patch_size=14, use_mean_pooling=False, qkv_bias=True,
                                        embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637)  # shrunk by small_lavis_vits
    else:
        vit = clip_vit.VisionTransformer(input_resolution=IMAGE, patch_size=14, width=1024, layers=22, heads=16,
                                         use_grad_checkpointing=False)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in vit.state_dict().items()}
    torch.save(state, path)
    return state


def build_stage1(tiny, vit_model, vit_config, vit_precision="fp32"):
    cls = registry.get_model_class("blip2_qformer_pformer")
    cfg = OmegaConf.create(dict(bert_model=tiny["bert"], vit_model=vit_model, vit_config=vit_config, image_size=IMAGE,
                                vit_precision=vit_precision, num_query_token=4, embed_dim=16, max_txt_len=16,
                                load_pretrained=False, alignment_weight=0))
    return cls.from_config(cfg)


@pytest.mark.parametrize("name", ["eva_clip_g", "clip_L"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_lavis_vit_from_a_local_file_offline(tiny, tmp_path, no_network, small_lavis_vits, name, precision):
    path = tmp_path / f"{name}.pth"
    state = save_small_vit(name, path)
    model = build_stage1(tiny, name, {"checkpoint": str(path)}, precision)
    loaded = model.visual_encoder.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].float(), value.half().float() if precision == "fp16" and loaded[key].dtype
                           == torch.float16 else value), key
    halves = {p.dtype for p in model.visual_encoder.parameters()} == {torch.float16, torch.float32}
    assert halves == (precision == "fp16")  # LAVIS's convert_weights_to_fp16: linear / conv weights only
    assert model.vision_record()["checkpoint"] == str(path)
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())  # frozen, as LAVIS does


def test_offline_uses_lavis_cache_when_no_file_is_given(tiny, tmp_path, monkeypatch, no_network, small_lavis_vits):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from lavis_pformer.vit_weights import lavis_vit_cache_file

    cached = lavis_vit_cache_file("eva_clip_g")
    assert cached.startswith(str(tmp_path)) and cached.endswith("eva_vit_g.pth")
    with pytest.raises(MissingFileError, match=r"offline .*model\.vit_config\.checkpoint"):
        build_stage1(tiny, "eva_clip_g", None)
    import os

    os.makedirs(os.path.dirname(cached), exist_ok=True)
    state = save_small_vit("eva_clip_g", cached)
    model = build_stage1(tiny, "eva_clip_g", None)
    assert torch.equal(model.visual_encoder.cls_token, state["cls_token"])


def test_wrong_file_or_sizes_are_user_errors(tiny, tmp_path, no_network, small_lavis_vits):
    path = tmp_path / "partial.pth"
    state = save_small_vit("eva_clip_g", path)
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.0.attn")}, path)
    with pytest.raises(CheckpointError, match="lacks .* parameters"):
        build_stage1(tiny, "eva_clip_g", {"checkpoint": str(path)})
    torch.save({k: v[..., :8] if k.startswith("blocks.0.mlp.fc1") else v for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match="other shapes"):
        build_stage1(tiny, "eva_clip_g", {"checkpoint": str(path)})
    with pytest.raises(ConfigError, match="size of eva_clip_g is fixed"):
        build_stage1(tiny, "eva_clip_g", {"checkpoint": str(path), "depth": 2})
    with pytest.raises(MissingFileError, match="vit_config.checkpoint"):
        build_stage1(tiny, "eva_clip_g", {"checkpoint": str(tmp_path / "nowhere.pth")})
