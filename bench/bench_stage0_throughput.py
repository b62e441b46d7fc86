"""Stage-0 (``pformer_opt``) training throughput, in sentences per second, at a given batch size.

One step = zero_grad, forward of ``pformer_opt`` (two masked views of each sentence through the P-Former,
the frozen OPT reconstructing the sentence from the prompt, the contrastive and VQ terms), backward,
AdamW step (fp16 autocast + GradScaler with ``--amp``, as LAVIS's runner). The same model is timed with its
loss terms switched on and off in the same rounds (the weights of the ``loss_c`` / ``loss_vq`` terms set to
0), so the table shows what each term costs next to ``loss_lm`` alone. Note that the encoder always runs
both views (the model's design), so "lm only" still pays for the second view.

    python bench/bench_stage0_throughput.py                         # tiny, CPU, batch 32
    python bench/bench_stage0_throughput.py --device cuda --batch 128
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import backbone_sizes as BS  # noqa: E402
import measure as M  # noqa: E402
import model_factories as MF  # noqa: E402
import reporting as R  # noqa: E402

import torch  # noqa: E402

SCRIPT = "bench_stage0_throughput"
VARIANTS = {  # name: (contrastive weight, vq weight)
    "lm + c + vq (default)": (1.0, 1.0),
    "lm + c": (1.0, 0.0),
    "lm only": (0.0, 0.0),
}


def build(sizes, args):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(dict(
        opt_model=sizes["opt"], bert_model=sizes["bert"], llm_precision=sizes["llm_precision"],
        num_query_token=sizes["num_query_token"], max_txt_len=sizes["max_txt_len"], embed_dim=256,
        mask_prob=0.25, vq_weight=1.0, vq_chunk_size=args.vq_chunk_size, load_pretrained=False))
    torch.manual_seed(0)
    return MF.build_registered("pformer_opt", cfg)


def training_steps(model, samples, variants, args):
    """{variant: one training step with its loss weights}, the optimizer, and {variant: its last losses}."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    scaler = torch.cuda.amp.GradScaler() if args.amp else None
    last = {}

    def step_with(name):
        c_weight, vq_weight = variants[name]

        def step():
            model.train()
            model.weights["c"], model.weights["vq"] = c_weight, vq_weight
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
                out = model(samples)
            if scaler is not None:
                scaler.scale(out["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                out["loss"].backward()
                optimizer.step()
            last[name] = {k: float(v) for k, v in out.items()}

        return step

    return {name: step_with(name) for name in variants}, optimizer, last


def tabulate(variants, times, peaks, last, args):
    """Results per variant and the table rows; ratios against the LM loss alone."""
    base = "lm only" if "lm only" in variants else next(iter(variants))
    results, rows = {}, []
    for name in variants:
        s = M.summarize(times[name])
        per_round = [args.batch / t for t in times[name]]
        r = M.ratio_summary(times[name], times[base])
        results[name] = dict(step=s, sentences_per_s=args.batch / s["median"],
                             sentences_per_s_spread=M.summarize(per_round), time_ratio_vs_lm_only=r,
                             peak_bytes=peaks[name], last_losses=last.get(name))
        rows.append([name, f"{args.batch / s['median']:.1f}",
                     f"{min(per_round):.1f}–{max(per_round):.1f}", R.fmt_s(s["median"]), R.fmt_spread(s),
                     f"{r['ratio']:.3f}x", f"{r['min_ratio']:.3f}x", R.fmt_mb(peaks[name])])
    headers = ["loss terms", "sentences/s (median)", "sentences/s min–max", "step ms (median)",
               "IQR (min–max) ms", f"time ratio vs {base}", "ratio of minima", "step peak MB"]
    return results, R.markdown_table(headers, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, batch_tiny=32, batch_paper=128, warmup=2)
    parser.add_argument("--vq-chunk-size", type=int, default=8192)
    parser.add_argument("--variants", default="all", help="'all' or 'default' (the full loss only)")
    args = C.finish_args(parser.parse_args(argv))
    C.quiet()
    machine = R.machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_stage0_") as work:
        sizes = BS.resolve_sizes(args, work)
        with BS.random_init_backbones(args.device if args.size == "paper" else "cpu"):
            model = build(sizes, args)
    model.to(args.device)
    samples = {"text_input": MF.captions(args.batch, seed=3)}
    variants = VARIANTS if args.variants == "all" else {k: v for k, v in VARIANTS.items() if "default" in k}
    fns, optimizer, last = training_steps(model, samples, variants, args)
    times = M.time_interleaved(fns, args.repeats, args.warmup, args.device)
    peaks = {name: M.peak_memory(fn, args.device, before=lambda: optimizer.zero_grad(set_to_none=True))
             for name, fn in fns.items()}
    model.weights["c"], model.weights["vq"] = 1.0, 1.0
    results, md = tabulate(variants, times, peaks, last, args)
    sizes_line = (f"{args.size}, P-Former on {sizes['bert_desc']}, frozen {sizes['opt_desc']}, "
                  f"Q={sizes['num_query_token']}, batch {args.batch}, {args.device}"
                  f"{', amp fp16' if args.amp else ', fp32'}")
    info = dict(params=M.param_count(model), trainable_params=M.param_count(model, trainable_only=True),
                model_bytes=M.module_bytes(model), optimizer_state_bytes=M.optimizer_state_bytes(optimizer))
    notes = [f"trainable parameters (the P-Former): {info['trainable_params']:,} of {info['params']:,}; AdamW state "
             f"{R.fmt_mb(info['optimizer_state_bytes'])} MB; params+buffers {R.fmt_mb(info['model_bytes'])} MB.",
             f"memory: {M.MEMORY_METHOD[C.device_tag(args.device)]}."]
    payload = dict(machine=machine, sizes=sizes, sizes_line=sizes_line, args=R.args_record(args), argv=argv,
                   results=results, model=info, times_s=times)
    R.publish(SCRIPT, args, machine, sizes_line, md, notes, payload)
    return payload


if __name__ == "__main__":
    main()
