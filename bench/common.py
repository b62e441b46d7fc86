"""Shared helpers of the benchmark scripts: sizes and backbones, model builders, timing, memory, machine, output.

Every script measures its variants side by side in one process: warm-up steps, then ``repeats`` rounds in
which each variant runs once (the order alternates between rounds), and reports the median and the spread
(IQR and min/max) of each, the ratio of the medians and the min/max of the per-round (paired) ratios.

Memory is measured in a separate, untimed call of the same step:

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call (tensor bytes, not
  the allocator's reserved pool).
- CPU: the allocation / free events that ``torch.profiler.profile(profile_memory=True)`` records from
  PyTorch's CPU allocator, replayed in time order: the peak of live tensor bytes above the level at the
  start of the call. It counts tensor storage only (not Python objects, not the process RSS).

Both are "peak above start": the model weights, frozen backbones and optimizer state that exist before
the step are reported separately as static bytes (see ``module_bytes`` / ``optimizer_state_bytes``).

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
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the profiler's warnings about pre-existing blocks

import torch  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
RANDOM_INIT_MARKER = "RANDOM_INIT_BACKBONE"
MB = 2 ** 20

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

WORDS = ("red green blue yellow purple orange black white gray brown pink small large big circle square triangle "
         "star man woman dog cat bird car tree street table sitting standing next near above below left right "
         "top bottom middle center corner").split()


def quiet():
    """Less noise from LAVIS / transformers / the profiler on the console."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.ERROR, force=True)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


# --- command line --------------------------------------------------------------------------------------------

def add_common_args(parser, batch_tiny, batch_paper, warmup=2):
    """--size, --device, --batch, --repeats, --warmup, --results-dir, --threads, --amp, backbone cuts."""
    parser.add_argument("--size", choices=("tiny", "paper"), default=None,
                        help="backbone sizes (default: tiny on CPU, paper on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default {batch_tiny} for tiny, {batch_paper} for paper)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per variant (default 21 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds before timing")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--tag", default="",
                        help="suffix of the result files (<script>_<device>_<tag>.json/.md), e.g. paper_stage2")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: 1 on CPU, torch's default on CUDA). Tiny ops do not "
                             "gain from more, and with other processes on the cores, intra-op threads that wait for "
                             "each other made tiny generate() calls 20x slower and their ratios meaningless")
    parser.add_argument("--amp", dest="amp", action="store_true", default=None,
                        help="fp16 autocast + GradScaler as LAVIS's runner with run.amp (default on CUDA)")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--opt-layers", type=int, default=None, help="OPT depth (paper: 32)")
    parser.add_argument("--t5-layers", type=int, default=None,
                        help="Flan-T5-XL encoder and decoder depth (paper: 24 each; stage 2t5 of the training bench)")
    parser.add_argument("--vit-depth", type=int, default=None, help="ViT depth (paper: 39, tiny: 2)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default 224)")
    parser.add_argument("--num-query-token", type=int, default=32)
    parser.add_argument("--max-txt-len", type=int, default=32)
    parser.add_argument("--backbones", default=None,
                        help="tiny: directory with bert/ and opt/ from `python -m lavis_pformer.tiny` "
                             "(default output/tiny/backbones, else built in a temporary directory)")
    parser.set_defaults(_batch_defaults=(batch_tiny, batch_paper))
    return parser


def finish_args(args):
    """Fill the defaults that depend on the device and size; set threads."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = str(torch.device(args.device))
    if args.size is None:
        args.size = "paper" if args.device.startswith("cuda") else "tiny"
    if args.batch is None:
        args.batch = args._batch_defaults[0 if args.size == "tiny" else 1]
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.amp and not args.device.startswith("cuda"):
        raise SystemExit("--amp needs a CUDA device (LAVIS's runner uses torch.cuda.amp)")
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 10 if args.device.startswith("cuda") else 21
    if args.image_size is None:
        args.image_size = 224
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return args


def device_tag(device):
    return "cuda" if str(device).startswith("cuda") else "cpu"


# --- backbones ------------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def random_init_backbones(init_device="cpu"):
    """While active, ``from_pretrained(<config-only dir>)`` builds the model from its config (random init,
    seeded by the path) on ``init_device``; frozen LLMs (OPT, T5) are built once per directory and shared.
    ``custom_vit`` is built on ``init_device`` too, seeded by its config (so every model gets the same ViT).
    Directories with weights load normally."""
    from transformers.modeling_utils import PreTrainedModel

    import lavis_pformer.backbones as backbones

    original = PreTrainedModel.__dict__["from_pretrained"]
    original_vit = backbones.custom_vit
    shared = {}

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
                return original_vit(img_size, vit_config, *args, **kwargs)
        finally:
            rng.__exit__(None, None, None)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    backbones.custom_vit = custom_vit
    try:
        yield shared
    finally:
        PreTrainedModel.from_pretrained = original
        backbones.custom_vit = original_vit


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
    from transformers import BertConfig

    from lavis_pformer.pformer import PFormer

    torch.manual_seed(1)
    teacher = PFormer(BertConfig.from_pretrained(sizes["bert"]), sizes["num_query_token"],
                      llm_hidden_size or sizes["llm_hidden_size"], llm_name or sizes["opt"], embed_dim=256,
                      bert_model=sizes["bert"])
    path = os.path.join(out_dir, filename)
    teacher.save(path)
    return path


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


# --- timing -----------------------------------------------------------------------------------------------------

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(fns, repeats, warmup, device):
    """{name: [seconds]}: ``warmup`` untimed rounds, then ``repeats`` rounds, each variant once per round
    (order reversed every other round)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(values):
    """median, q1, q3 (IQR), min, max, n of a list of numbers."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return dict(median=statistics.median(values), q1=q1, q3=q3, min=values[0], max=values[-1], n=len(values))


def ratio_summary(a, b):
    """Ratio of the medians of ``a`` and ``b``, the min/median/max of the per-round ratios a_i / b_i, and the
    ratio of the minima (on a CPU shared with other processes the fastest round is the least disturbed one)."""
    paired = [x / y for x, y in zip(a, b)]
    return dict(ratio=statistics.median(a) / statistics.median(b), paired_median=statistics.median(paired),
                paired_min=min(paired), paired_max=max(paired), min_ratio=min(a) / min(b))


# --- memory -------------------------------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() around one untimed call (tensor bytes)",
    "cpu": "peak of live CPU tensor bytes above the start of one untimed call, replayed from the allocation events "
           "of torch.profiler.profile(profile_memory=True) (tensor storage only; not RSS)",
}


def peak_memory(fn, device, before=None):
    """Bytes: peak of allocated tensor memory during ``fn()`` above the level at its start.

    ``before`` runs first, outside the measurement: training steps pass ``optimizer.zero_grad(set_to_none=True)``
    so that the gradients are allocated inside the measured step (otherwise freeing the previous step's gradients
    at the start of the step would hide them: the level at the start would include them).
    """
    if before is not None:
        before()
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _unique_tensors(tensors):
    seen, out = set(), []
    for t in tensors:
        if t is None:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))


def module_bytes(module, trainable_only=False):
    """Bytes of the module's parameters (+ buffers unless trainable_only), shared storages counted once."""
    if module is None:
        return 0
    tensors = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(module.buffers())
    return tensor_bytes(tensors)


def param_count(module, trainable_only=False):
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def optimizer_state_bytes(optimizer):
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])


# --- machine and output ----------------------------------------------------------------------------------------

def machine_info(device):
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = dict(cpu=cpu, cpu_cores=cores, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), device=str(device), gpu=None)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes competing for the CPU
    except OSError:
        pass
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def machine_line(info):
    where = f"GPU {info['gpu']}, " if info.get("gpu") else ""
    return (f"{where}CPU {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads), "
            f"load {info.get('load_average_1min', '?')}, torch {info['torch']}, {info['date']}"
            + (f", git {info['git']}" if info.get("git") else ""))


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(s):
    """Seconds as ms with 3 significant digits."""
    ms = s * 1000
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mb(b):
    return f"{b / MB:.1f}"


def fmt_spread(stats):
    return f"{fmt_s(stats['q1'])}–{fmt_s(stats['q3'])} ({fmt_s(stats['min'])}–{fmt_s(stats['max'])})"


def write_results(script, args, payload, table, notes=()):
    """``<results-dir>/<script>_<device>.json`` (latest run) and append the table to ``.md``; returns paths."""
    os.makedirs(args.results_dir, exist_ok=True)
    tag = f"_{args.tag}" if getattr(args, "tag", "") else ""
    base = os.path.join(args.results_dir, f"{script}_{device_tag(args.device)}{tag}")
    payload = dict(script=script, **payload)
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    if sys.argv[0].endswith(script + ".py"):
        cmd = ("python bench/" + script + ".py " + " ".join(sys.argv[1:])).strip()
    else:
        cmd = f"{script}.main({payload.get('argv')})"
    lines = [f"## {payload['machine']['date']} — {script} ({payload['sizes_line']})", "",
             f"Machine: {machine_line(payload['machine'])}.", f"Command: `{cmd}`.", "", table, ""]
    lines += [f"- {n}" for n in notes]
    with open(base + ".md", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return base + ".json", base + ".md"


def args_record(args):
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
