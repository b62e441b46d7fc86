"""How fast one DataLoader worker turns webdataset shards into training samples, next to a stage-1 step at the
paper's sizes on the same CPU, and what that means for the workers a GPU needs.

The loader: ``ShardCaptionDataset`` (``image_text_shards``) over shards written by ``python -m
lavis_pformer.datasets.to_shards`` from synthetic JPEGs of ``--source-px`` pixels (img2dataset's default size is
256), with LAVIS's ``blip2_image_train`` at 224 px and ``blip_caption``, the default shuffle buffer, and batches
collated as in a worker: the work of one DataLoader worker (read the tar, decode the JPEG, random resized crop,
flip, normalise), on one thread, in this process. The shards sit in the page cache: disk or network reads are not
measured. The step: bench_train_step's stage-1 step (``blip2_qformer_pformer`` with its P-Former teacher, w = 10;
zero_grad, forward, backward, AdamW) at the paper's sizes (``--size paper``: EVA ViT-g sized, BERT-base Q-Former)
or tiny ones, batch ``--batch``. Both are timed in the same rounds (interleaved, order alternating).

    python bench/bench_shard_loader.py --size paper --batch 2 --repeats 5 --warmup 1
    python bench/bench_shard_loader.py                     # tiny step (a smoke run)
"""
import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import backbone_sizes as BS  # noqa: E402
import measure as M  # noqa: E402
import model_factories as MF  # noqa: E402
import reporting as R  # noqa: E402
from train_step_pair import TrainStep  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SCRIPT = "bench_shard_loader"
GPU_BATCH = 128  # the paper configs' batch per GPU in stage 1 (projects/pformer/train/pretrain_stage1*.yaml)
ASSUMED_GPU_STEPS = (0.25, 0.5, 1.0, 2.0)  # seconds per stage-1 step of GPU_BATCH pairs: assumptions, not measured


def write_shards(root, pairs, px, shard_size, seed=0):
    """``pairs`` synthetic photos (smooth colour fields with noise, JPEG quality 90, ``px`` x ``px``) with captions,
    written as shards by the plugin's converter; returns (storage pattern, mean JPEG bytes)."""
    from lavis_pformer.datasets.to_shards import convert

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    records, sizes = [], []
    for i, caption in enumerate(MF.captions(pairs, seed=seed)):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((px, px), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (px, px, 3))
        path = os.path.join(root, "images", f"{i:06d}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(os.path.getsize(path))
        records.append({"image": f"images/{i:06d}.jpg", "caption": caption, "image_id": i})
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump(records, f)
    pattern, _, _ = convert([os.path.join(root, "captions.json")], root, os.path.join(root, "shards"), shard_size)
    return pattern, sum(sizes) / len(sizes)


def shard_round(pattern, samples, batch):
    """A function that makes the next ``samples`` training samples (in batches of ``batch``) from the shards, as
    one DataLoader worker does; the stream continues across calls."""
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor, BlipCaptionProcessor
    from webdataset.shardlists import expand_urls

    from lavis_pformer.datasets.shard_samples import BadShare, SampleFormat
    from lavis_pformer.datasets.shard_stream import ShardCaptionDataset

    dataset = ShardCaptionDataset(expand_urls(pattern), Blip2ImageTrainProcessor(image_size=224),
                                  BlipCaptionProcessor(), SampleFormat(), BadShare())
    stream = iter(dataset)

    def run():
        for _ in range(samples // batch):
            batch_out = ShardCaptionDataset.collate([next(stream) for _ in range(batch)])
        assert batch_out["image"].shape == (batch, 3, 224, 224)

    return run


def stage1_step(sizes, teacher, args):
    model = MF.build_registered("blip2_qformer_pformer", MF.model_cfg(
        sizes, alignment_weight=10.0, pformer_checkpoint=teacher, opt_model=None, cross_attention_freq=2,
        embed_dim=256), for_training=True).to(args.device)
    samples = {"image": MF.images(args.batch, sizes["image_size"], args.device),
               "text_input": MF.captions(args.batch)}
    return TrainStep(model, samples, "fp16" if args.amp else "fp32", args.device)


def workers_per_gpu(rate):
    """[(assumed GPU step s, GPU pairs/s, workers)] for a GPU step of GPU_BATCH pairs and ``rate`` samples/s per
    worker."""
    return [(t, GPU_BATCH / t, math.ceil(GPU_BATCH / (t * rate))) for t in ASSUMED_GPU_STEPS]


def table(result):
    loader, step = result["loader"], result["step"]
    rows = [["shard loader, one worker (1 thread)", f"{result['samples_per_round']} samples",
             R.fmt_s(loader["median"]), R.fmt_spread(loader), f"**{result['loader_rate']:.1f}**"],
            [f"stage-1 step ({result['sizes_line']})", f"{result['batch']} pairs", R.fmt_s(step["median"]),
             R.fmt_spread(step), f"{result['step_rate']:.3f}"]]
    out = R.markdown_table(["what", "per round", "median", "IQR (min–max)", "samples/s"], rows)
    out += (f"\n\nOne worker makes **{result['worker_vs_step']['ratio']:.0f}x** the samples this CPU's stage-1 step "
            f"consumes (per-round ratios {result['worker_vs_step']['paired_min']:.0f}–"
            f"{result['worker_vs_step']['paired_max']:.0f}).\n\n")
    calc = [[f"{t:g} s", f"{pairs:.0f}", f"{n}"] for t, pairs, n in result["workers_per_gpu"]]
    out += R.markdown_table([f"GPU stage-1 step of {GPU_BATCH} pairs (assumed)", "pairs/s the GPU takes",
                             f"workers = ceil({GPU_BATCH} / (step s x {result['loader_rate']:.1f}))"], calc)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, batch_tiny=8, batch_paper=2, warmup=1)
    parser.add_argument("--pairs", type=int, default=512, help="synthetic pairs in the shards")
    parser.add_argument("--source-px", type=int, default=256, help="side of the stored JPEGs (img2dataset: 256)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128, help="samples the loader makes per round")
    parser.add_argument("--loader-batch", type=int, default=32, help="batch the loader collates")
    args = C.finish_args(parser.parse_args(argv))
    C.quiet()
    if args.samples % args.loader_batch:
        raise SystemExit("--samples must be a multiple of --loader-batch")
    machine = R.machine_info(args.device)
    created = MF.ensure_process_group(args.device)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_shards_") as work:
            pattern, jpeg_bytes = write_shards(os.path.join(work, "data"), args.pairs, args.source_px,
                                               args.shard_size)
            sizes = BS.resolve_sizes(args, work)
            teacher = MF.make_teacher(sizes, work)
            init_device = args.device if args.size == "paper" else "cpu"
            with BS.random_init_backbones(init_device):
                step = stage1_step(sizes, teacher, args)
            times = M.time_interleaved({"loader": shard_round(pattern, args.samples, args.loader_batch), "step": step},
                                       args.repeats, args.warmup, args.device)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    sizes_line = (f"{args.size}, {sizes['bert_desc']}, {sizes['vit_desc']}, Q={sizes['num_query_token']}, batch "
                  f"{args.batch}, {args.device}{', amp fp16' if args.amp else ', fp32'}")
    loader, step_stats = M.summarize(times["loader"]), M.summarize(times["step"])
    rates = {"loader": [args.samples / t for t in times["loader"]], "step": [args.batch / t for t in times["step"]]}
    result = dict(samples_per_round=args.samples, batch=args.batch, sizes_line=sizes_line, loader=loader,
                  step=step_stats, loader_rate=args.samples / loader["median"], step_rate=args.batch / step_stats["median"],
                  worker_vs_step=M.ratio_summary(rates["loader"], rates["step"]), jpeg_bytes=jpeg_bytes,
                  times_s=times)
    result["workers_per_gpu"] = workers_per_gpu(result["loader_rate"])
    notes = [
        f"shards: {args.pairs} synthetic photos of {args.source_px} px, {jpeg_bytes / 1024:.0f} KB each on average "
        f"(JPEG quality 90), {args.shard_size} per shard, in the page cache (no disk or network read is measured); "
        "blip2_image_train at 224 px, blip_caption, shuffle buffer 1000, batches of "
        f"{args.loader_batch} collated.",
        "ratio = samples/s of one worker / samples/s of the step, per round (both in the same rounds).",
        f"workers per GPU: a GPU that takes a stage-1 step of {GPU_BATCH} pairs (the paper configs' batch per GPU) "
        f"in t seconds consumes {GPU_BATCH}/t pairs/s; workers making r samples/s each keep up when their number is "
        f"at least {GPU_BATCH}/(t r). The step times t are assumptions (no GPU here), r is measured above on one "
        "core of this machine (a GPU host's cores may be faster or slower); each worker needs a core of its own.",
    ]
    payload = dict(machine=machine, sizes=sizes, sizes_line=sizes_line, args=R.args_record(args), argv=argv,
                   results=[result])
    R.publish(SCRIPT, args, machine, sizes_line, table(result), notes, payload)
    return payload


if __name__ == "__main__":
    main()
