"""Backbone sizes of the benchmarks and their directories.

Sizes (``--size``):

- ``tiny`` (CPU default): the tiny offline BERT / OPT of ``lavis_pformer.tiny`` (``output/tiny`` when it
  exists, else built into a temporary directory), a small ViT through ``custom_vit``.
- ``paper``: BERT-base, OPT-2.7B (``--opt-layers`` cuts its depth), Flan-T5-XL for the T5 stage (``--t5-layers``
  cuts it), a ViT sized like LAVIS's
  ``eva_clip_g`` (patch 14, width 1408, 39 blocks, 16 heads, MLP ratio 4.3637; ``--vit-depth`` cuts it),
  224 px, Q = 32, 32 text tokens, all randomly initialised from configs (no weights are downloadable
  here). Their directories hold a config and tokenizer files but no weights; ``random_init_backbones``
  makes ``from_pretrained`` build such a directory's model from its config, with a seed derived from
  the path, so that two models built from the same directory get the same weights (the frozen LLM is
  built once and shared).
"""
import contextlib
import itertools
import json
import os
import shutil
import tempfile
import zlib

import torch

from common import REPO


RANDOM_INIT_MARKER = "RANDOM_INIT_BACKBONE"


# Paper sizes (docs/method.md; LAVIS's create_eva_vit_g for the ViT).
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512)


OPT_2_7B = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2560)


# google/flan-t5-xl's config (LAVIS's blip2_t5 pretrain_flant5xl).
FLAN_T5_XL = dict(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=32,
                  vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


EVA_CLIP_G = dict(patch_size=14, embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637)


TINY_VIT = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4)


_TINY_CACHE = {}


def tiny_backbone_dirs(root=None, t5=False):
    """{"bert": dir, "opt": dir} (and "t5" with ``t5``) of the tiny backbones (built once per process when missing)."""
    root = root or os.path.join(REPO, "output", "tiny", "backbones")
    names = ("bert", "opt", "t5") if t5 else ("bert", "opt")
    if all(os.path.isfile(os.path.join(root, name, "config.json")) for name in names):
        return {name: os.path.join(root, name) for name in names}
    from lavis_pformer.tiny import build_bert, build_opt, build_t5

    builders = {"bert": build_bert, "opt": build_opt, "t5": build_t5}
    if "root" not in _TINY_CACHE:
        _TINY_CACHE["root"] = tempfile.mkdtemp(prefix="bench_tiny_")
    dirs = _TINY_CACHE.setdefault("dirs", {})
    for name in names:
        if name not in dirs:
            dirs[name] = builders[name](os.path.join(_TINY_CACHE["root"], name))
    return {name: dirs[name] for name in names}


def write_random_init_t5_dir(root, tiny_t5_dir, t5_layers=None):
    """A config-only Flan-T5-XL directory (the tiny T5's sentencepiece tokenizer; no weights).

    The tokenizer only produces the tiny ids, all below Flan-T5's 32,128 embedding rows.
    """
    from transformers import T5Config

    t5_dir = os.path.join(root, "flan_t5_xl")
    os.makedirs(t5_dir, exist_ok=True)
    for name in os.listdir(tiny_t5_dir):
        if not name.endswith((".bin", ".safetensors")) and name != "config.json":
            shutil.copy(os.path.join(tiny_t5_dir, name), t5_dir)
    t5 = dict(FLAN_T5_XL)
    if t5_layers:
        t5["num_layers"] = t5["num_decoder_layers"] = t5_layers
    T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **t5).save_pretrained(t5_dir)
    open(os.path.join(t5_dir, RANDOM_INIT_MARKER), "w").write("weights: random, built from config.json\n")
    return t5_dir


def add_t5(sizes, args, workdir):
    """Add the frozen T5 of ``args.size`` to ``sizes``: "t5" (directory), "t5_desc", "t5_hidden_size"."""
    from transformers import AutoConfig

    tiny = tiny_backbone_dirs(args.backbones, t5=True)
    if args.size == "tiny":
        if args.t5_layers:
            raise SystemExit("--t5-layers applies to --size paper (the tiny T5 has 2 + 2 layers)")
        t5_dir = tiny["t5"]
    else:
        t5_dir = write_random_init_t5_dir(os.path.join(workdir, "backbones"), tiny["t5"], args.t5_layers)
    cfg = AutoConfig.from_pretrained(t5_dir)
    sizes.update(t5=t5_dir, t5_hidden_size=cfg.d_model,
                 t5_desc=f"T5 {cfg.num_layers}+{cfg.num_decoder_layers}x{cfg.d_model} (vocab {cfg.vocab_size})")
    return sizes


def write_random_init_dirs(root, tiny_dirs, opt_layers=None):
    """Config-only BERT-base and OPT-2.7B directories (tokenizers from the tiny backbones; no weights).

    The BERT vocabulary is the tiny one padded with ``[unusedN]`` entries to BERT-base's 30,522 rows, so the
    tokenizer, the Q-Former and the P-Former agree on the vocabulary size; the OPT tokenizer is the tiny BPE
    with its vocabulary padded to OPT's 50,272 ids (encoding only produces the tiny ids).
    """
    from transformers import BertConfig, OPTConfig

    bert_dir, opt_dir = os.path.join(root, "bert_base"), os.path.join(root, "opt_2.7b")
    os.makedirs(bert_dir, exist_ok=True)
    os.makedirs(opt_dir, exist_ok=True)
    vocab = open(os.path.join(tiny_dirs["bert"], "vocab.txt")).read().split("\n")
    vocab = [v for v in vocab if v]
    vocab += [f"[unused{i}]" for i in range(BERT_BASE["vocab_size"] - len(vocab))]
    with open(os.path.join(bert_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tiny_dirs["bert"], name), bert_dir)
    BertConfig(**BERT_BASE).save_pretrained(bert_dir)
    for name in ("merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tiny_dirs["opt"], name), opt_dir)
    # The tiny BPE, its vocabulary padded with "<xN>" entries to OPT's 50,272 ids so that any id a random OPT
    # generates decodes (the merges never produce them when encoding).
    bpe = json.load(open(os.path.join(tiny_dirs["opt"], "vocab.json")))
    ids = set(bpe.values())
    bpe.update({f"<x{i}>": i for i in range(OPT_2_7B["vocab_size"]) if i not in ids})
    with open(os.path.join(opt_dir, "vocab.json"), "w") as f:
        json.dump(bpe, f)
    opt = dict(OPT_2_7B)
    if opt_layers:
        opt["num_hidden_layers"] = opt_layers
    OPTConfig(pad_token_id=1, bos_token_id=2, eos_token_id=2, do_layer_norm_before=True, **opt).save_pretrained(opt_dir)
    for d in (bert_dir, opt_dir):
        open(os.path.join(d, RANDOM_INIT_MARKER), "w").write("weights: random, built from config.json\n")
    return {"bert": bert_dir, "opt": opt_dir}


def resolve_sizes(args, workdir):
    """The backbone directories and model-size settings of ``args.size``: a dict recorded in the results."""
    tiny = tiny_backbone_dirs(args.backbones)
    if args.size == "tiny":
        vit = dict(TINY_VIT)
        if args.vit_depth:
            vit["depth"] = args.vit_depth
        if args.opt_layers:
            raise SystemExit("--opt-layers applies to --size paper (the tiny OPT has 2 layers)")
        dirs = dict(tiny)
    else:
        vit = dict(EVA_CLIP_G)
        if args.vit_depth:
            vit["depth"] = args.vit_depth
        dirs = write_random_init_dirs(os.path.join(workdir, "backbones"), tiny, args.opt_layers)
    on_cuda = args.device.startswith("cuda")
    from transformers import AutoConfig

    bert_cfg, opt_cfg = AutoConfig.from_pretrained(dirs["bert"]), AutoConfig.from_pretrained(dirs["opt"])
    return dict(
        size=args.size, bert=dirs["bert"], opt=dirs["opt"], vit_config=vit, image_size=args.image_size,
        num_query_token=args.num_query_token, max_txt_len=args.max_txt_len,
        # LAVIS's precisions on a GPU (fp16 ViT and OPT); fp32 on CPU, as load_model does there.
        vit_precision="fp16" if on_cuda else "fp32", llm_precision="fp16" if on_cuda else "fp32",
        bert_desc=f"BERT {bert_cfg.num_hidden_layers}x{bert_cfg.hidden_size} (vocab {bert_cfg.vocab_size})",
        opt_desc=f"OPT {opt_cfg.num_hidden_layers}x{opt_cfg.hidden_size} (vocab {opt_cfg.vocab_size})",
        vit_desc=f"ViT {vit['depth']}x{vit['embed_dim']} patch {vit['patch_size']} @ {args.image_size}px",
        llm_hidden_size=opt_cfg.hidden_size,
    )


def _is_random_init_dir(path):
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, RANDOM_INIT_MARKER))


def _seeded(key, device):
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    rng = torch.random.fork_rng(devices=devices)
    rng.__enter__()
    torch.manual_seed(zlib.crc32(str(key).encode()))
    return rng


def keep_in_files(module, directory):
    """Move ``module``'s parameters and buffers into files under ``directory``, mapped into memory (shared):
    their bytes then live in the page cache, which the kernel writes back and drops when memory is short, not
    in the process's own memory. Shapes, dtypes and byte counts are unchanged; tied tensors stay tied; a module
    built on the meta device gets zero-filled tensors (initialise them afterwards)."""
    os.makedirs(directory, exist_ok=True)
    moved = {}  # id of the old tensor -> (old tensor, kept alive so that no id is reused meanwhile; new tensor)
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    path = os.path.join(directory, f"{len(moved)}.bin")
                    mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
                    mapped = mapped.view(tensor.shape)
                    if tensor.device.type != "meta":
                        mapped.copy_(tensor.detach())
                    if isinstance(tensor, torch.nn.Parameter):
                        mapped = torch.nn.Parameter(mapped, requires_grad=tensor.requires_grad)
                    moved[id(tensor)] = (tensor, mapped)
                table[name] = moved[id(tensor)][1]
    return module


def _llm_in_files(cls, config, directory):
    """A frozen LLM built on the meta device, its tensors in files (``keep_in_files``), then initialised as
    ``from_pretrained`` of a config would: each layer's own reset, the model's ``_init_weights``, tied weights."""
    with torch.device("meta"):
        model = cls(config)
    keep_in_files(model, directory)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.apply(model._init_weights)
    model.tie_weights()
    return model


@contextlib.contextmanager
def random_init_backbones(init_device="cpu", files_dir=None):
    """While active, ``from_pretrained(<config-only dir>)`` builds the model from its config (random init,
    seeded by the path) on ``init_device``; frozen LLMs (OPT, T5) are built once per directory and shared.
    ``custom_vit`` is built on ``init_device`` too, seeded by its config (so every model gets the same ViT).
    Directories with weights load normally.

    ``files_dir`` (CPU): the frozen LLMs and ViT keep their tensors in files there (``keep_in_files``), so that
    the paper sizes fit a machine with little memory; the LLM is then built in fp32, whatever dtype
    ``from_pretrained`` is asked for (a cast would copy it back into memory)."""
    from transformers.modeling_utils import PreTrainedModel

    import lavis_pformer.backbones as backbones

    original = PreTrainedModel.__dict__["from_pretrained"]
    original_vit = backbones.custom_vit
    shared, in_files = {}, itertools.count()  # in_files: a new folder for each module kept in files

    def from_pretrained(cls, path, *args, **kwargs):
        if not _is_random_init_dir(path):
            return original.__func__(cls, path, *args, **kwargs)
        config = kwargs.pop("config", None) or cls.config_class.from_pretrained(path)
        dtype = kwargs.pop("torch_dtype", None)
        model_kwargs = {k: kwargs[k] for k in ("add_pooling_layer",) if k in kwargs}
        frozen = config.model_type in ("opt", "t5")
        key = (cls.__module__, cls.__name__, os.path.abspath(path))
        if frozen and key in shared:
            return shared[key]
        rng = _seeded(key, init_device)
        try:
            if frozen and files_dir:
                model = _llm_in_files(cls, config, os.path.join(files_dir, f"llm{next(in_files)}"))
                dtype = None
            else:
                with torch.device(init_device):
                    model = cls(config, **model_kwargs)
        finally:
            rng.__exit__(None, None, None)
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
        if frozen:
            shared[key] = model
        return model

    def custom_vit(img_size, vit_config, *args, **kwargs):
        rng = _seeded(("vit", img_size, sorted((vit_config or {}).items())), init_device)
        try:
            with torch.device(init_device):
                vit = original_vit(img_size, vit_config, *args, **kwargs)
        finally:
            rng.__exit__(None, None, None)
        if files_dir:
            keep_in_files(vit, os.path.join(files_dir, f"vit{next(in_files)}"))
        return vit

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    backbones.custom_vit = custom_vit
    try:
        yield shared
    finally:
        PreTrainedModel.from_pretrained = original
        backbones.custom_vit = original_vit
