"""The models the benchmarks compare (the plugin's, LAVIS's own at the same sizes), the P-Former teacher, and
synthetic inputs."""
import os

import torch


WORDS = ("red green blue yellow purple orange black white gray brown pink small large big circle square triangle "
         "star man woman dog cat bird car tree street table sitting standing next near above below left right "
         "top bottom middle center corner").split()


def model_cfg(sizes, **overrides):
    """The OmegaConf model config of the plugin's BLIP-2 models at these sizes."""
    from omegaconf import OmegaConf

    cfg = dict(bert_model=sizes["bert"], vit_model="custom_vit", vit_config=sizes["vit_config"],
               image_size=sizes["image_size"], vit_precision=sizes["vit_precision"],
               llm_precision=sizes["llm_precision"], num_query_token=sizes["num_query_token"],
               max_txt_len=sizes["max_txt_len"], load_pretrained=False, load_finetuned=False, freeze_vit=True,
               opt_model=sizes["opt"])
    cfg.update(overrides)
    return OmegaConf.create({k: v for k, v in cfg.items() if v is not None})


def build_registered(name, cfg, **kwargs):
    import lavis_pformer  # noqa: F401  (registers the plugin's models)
    from lavis.common.registry import registry

    return registry.get_model_class(name).from_config(cfg, **kwargs)


def stock_model(lavis_cls, sizes, visual_encoder=None, **kwargs):
    """LAVIS's own class (``Blip2OPT``, ``Blip2Qformer``), only its hard-coded backbones redirected to
    ``sizes`` (the BERT directory, ``custom_vit``) as the tests do. ``visual_encoder``: reuse this frozen ViT
    instead of building one (the same backbone object as the plugin model's)."""
    from lavis_pformer.backbones import BackboneMixin

    def init_vision_encoder(self, *a, **k):
        if visual_encoder is None:
            return BackboneMixin.init_vision_encoder(self, *a, **k)
        from lavis.models.blip2_models.blip2 import LayerNorm

        # LAVIS replaced the frozen ViT's train() by disabled_train on the instance, under which .eval() returns
        # False; LAVIS's constructor calls .eval() and sets it again, so drop it first.
        visual_encoder.__dict__.pop("train", None)
        return visual_encoder, LayerNorm(visual_encoder.num_features)

    stock = type(f"Stock{lavis_cls.__name__}", (lavis_cls,), {
        "init_tokenizer": BackboneMixin.init_tokenizer,
        "init_Qformer": BackboneMixin.init_Qformer,
        "init_vision_encoder": init_vision_encoder,
    })
    self_init = stock.__init__

    def __init__(self, **kw):
        BackboneMixin.set_backbones(self, sizes["bert"], sizes["vit_config"])
        self_init(self, **kw)

    stock.__init__ = __init__
    return stock(vit_model="custom_vit", img_size=sizes["image_size"], vit_precision=sizes["vit_precision"],
                 num_query_token=sizes["num_query_token"], max_txt_len=sizes["max_txt_len"], **kwargs)


def make_teacher(sizes, out_dir, llm_name=None, llm_hidden_size=None, filename="pformer.pth"):
    """A randomly initialised P-Former (the BERT of ``sizes``, Q, the LLM width) saved with ``PFormer.save``.
    Default LLM: the OPT of ``sizes``."""
    from lavis_pformer.pformer import save_untrained_pformer

    return save_untrained_pformer(os.path.join(out_dir, filename), sizes["bert"], sizes["num_query_token"],
                                  llm_hidden_size or sizes["llm_hidden_size"], llm_name or sizes["opt"], embed_dim=256,
                                  seed=1, bert_weights=False)


def ensure_process_group(device):
    """LAVIS's Blip2Qformer.forward calls dist.get_rank(): a one-rank group, as train.py starts.
    Returns True when it created the group (the caller destroys it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def captions(n, seed=0, words=12):
    """``n`` captions of about ``words`` words from the tiny tokenizers' vocabulary."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = max(3, words + rng.randint(-3, 3))
        out.append("a " + " ".join(rng.choice(WORDS) for _ in range(k - 1)))
    return out


def images(n, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g).to(device)
