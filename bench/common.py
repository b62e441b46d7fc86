"""What every benchmark script shares: the environment (offline, quiet) and the command line.

The other helpers, by concern: ``backbone_sizes`` (tiny and paper-size backbones), ``model_factories`` (the models,
teachers and inputs), ``measure`` (timing and memory), ``reporting`` (machine, tables, result files).
"""
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the profiler's warnings about pre-existing blocks

import torch  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


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


