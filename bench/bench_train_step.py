"""What the alignment loss costs per training step: the plugin's stage-1/2 models vs LAVIS's own classes.

Stage 2: ``blip2_opt_pformer`` (alignment_weight 100, with its frozen P-Former teacher) vs LAVIS's
``Blip2OPT``; stage 2t5: ``blip2_t5_pformer`` (w = 100, a P-Former for the T5) vs LAVIS's ``Blip2T5``, both fed
the same prefix / suffix split of each caption; stage 1: ``blip2_qformer_pformer`` (w = 10) vs LAVIS's
``Blip2Qformer``. The stock model is
LAVIS's class with only its hard-coded backbones redirected (as in tests/test_stage12_models.py); it gets
the plugin model's weights (``load_state_dict`` of the plugin model's state dict) and shares its frozen
ViT and LLM objects, so both run the same weights on the same batch. One step = zero_grad, forward (under
fp16 autocast with ``--amp``, as LAVIS's runner), backward, AdamW step (through a GradScaler with --amp).

Also timed in the same rounds: the teacher's forward alone (``teacher_prompt``), to show where the
difference comes from.

    python bench/bench_train_step.py                      # tiny, CPU
    python bench/bench_train_step.py --device cuda        # paper sizes, amp
    python bench/bench_train_step.py --stages 2t5         # the Flan-T5 twin of stage 2
"""
import argparse
import gc
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

SCRIPT = "bench_train_step"
STAGES = {
    "2": dict(name="stage 2", ours="blip2_opt_pformer", weight=100.0, lavis="Blip2OPT"),
    "1": dict(name="stage 1", ours="blip2_qformer_pformer", weight=10.0, lavis="Blip2Qformer"),
    "2t5": dict(name="stage 2 (Flan-T5)", ours="blip2_t5_pformer", weight=100.0, lavis="Blip2T5"),
}


def build_pair(stage, sizes, teacher):
    """(plugin model with teacher, stock LAVIS model with the same weights), both on CPU."""
    spec = STAGES[stage]
    if stage == "2":
        from lavis.models.blip2_models.blip2_opt import Blip2OPT as lavis_cls

        cfg = MF.model_cfg(sizes, alignment_weight=spec["weight"], pformer_checkpoint=teacher)
        extra = dict(opt_model=sizes["opt"])
    elif stage == "2t5":
        from lavis.models.blip2_models.blip2_t5 import Blip2T5 as lavis_cls

        cfg = MF.model_cfg(sizes, alignment_weight=spec["weight"], pformer_checkpoint=teacher, opt_model=None,
                          t5_model=sizes["t5"])
        extra = dict(t5_model=sizes["t5"])
    else:
        from lavis.models.blip2_models.blip2_qformer import Blip2Qformer as lavis_cls

        cfg = MF.model_cfg(sizes, alignment_weight=spec["weight"], pformer_checkpoint=teacher, opt_model=None,
                          cross_attention_freq=2, embed_dim=256)
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
    extra_trainable = sorted(trainable_ours - trainable_stock)
    assert trainable_stock <= trainable_ours, sorted(trainable_stock - trainable_ours)
    return ours, stock, extra_trainable


def make_step(model, samples, amp):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    scaler = torch.cuda.amp.GradScaler() if amp else None

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = model(samples)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss

    return step, optimizer


def bench_stage(stage, sizes, teacher, args):
    ours, stock, extra_trainable = build_pair(stage, sizes, teacher)
    ours.to(args.device)
    stock.to(args.device)
    samples = {"image": MF.images(args.batch, sizes["image_size"], args.device),
               "text_input": MF.captions(args.batch)}
    if stage == "2t5":  # the same prefix / suffix split for both models (LAVIS's Blip2T5 needs text_output)
        words = [c.split() for c in samples["text_input"]]
        samples = dict(samples, text_input=[" ".join(w[: len(w) // 2]) for w in words],
                       text_output=[" ".join(w[len(w) // 2:]) for w in words])
    step_ours, opt_ours = make_step(ours, samples, args.amp)
    step_stock, opt_stock = make_step(stock, samples, args.amp)

    def teacher_forward():
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
            ours.teacher_prompt(ours.alignment_texts(samples))

    times = M.time_interleaved({"ours": step_ours, "stock": step_stock, "teacher": teacher_forward},
                               args.repeats, args.warmup, args.device)
    peaks = {"ours": M.peak_memory(step_ours, args.device, before=lambda: opt_ours.zero_grad(set_to_none=True)),
             "stock": M.peak_memory(step_stock, args.device, before=lambda: opt_stock.zero_grad(set_to_none=True)),
             "teacher": M.peak_memory(teacher_forward, args.device)}
    losses = {k: float(f()) for k, f in (("ours", step_ours), ("stock", step_stock))}
    result = dict(stage=STAGES[stage]["name"], ours_model=STAGES[stage]["ours"], lavis_class=STAGES[stage]["lavis"],
                  alignment_weight=STAGES[stage]["weight"], extra_trainable=extra_trainable,
                  last_loss=losses, times_s=times, memory_method=M.MEMORY_METHOD[C.device_tag(args.device)])
    for key, model, optimizer in (("ours", ours, opt_ours), ("stock", stock, opt_stock)):
        teacher_bytes = M.module_bytes(getattr(model, "pformer_teacher", None))
        model_bytes = M.module_bytes(model)
        opt_bytes = M.optimizer_state_bytes(optimizer)
        result[key] = dict(
            step=M.summarize(times[key]), step_peak_bytes=peaks[key], model_bytes=model_bytes,
            trainable_bytes=M.module_bytes(model, trainable_only=True), optimizer_state_bytes=opt_bytes,
            teacher_bytes=teacher_bytes, params=M.param_count(model),
            trainable_params=M.param_count(model, trainable_only=True),
            footprint_bytes=model_bytes + opt_bytes + peaks[key],
        )
    result["teacher_forward"] = dict(step=M.summarize(times["teacher"]), step_peak_bytes=peaks["teacher"])
    result["time_ratio"] = M.ratio_summary(times["ours"], times["stock"])
    result["teacher_share_of_stock_step"] = M.summarize([t / s for t, s in zip(times["teacher"], times["stock"])])
    result["footprint_ratio"] = result["ours"]["footprint_bytes"] / result["stock"]["footprint_bytes"]
    result["step_peak_ratio"] = peaks["ours"] / peaks["stock"]
    del ours, stock, step_ours, step_stock, opt_ours, opt_stock
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def table(results):
    headers = ["stage", "model", "step ms (median)", "IQR (min–max) ms", "time ratio", "paired ratio min–max",
               "ratio of minima",
               "step peak MB", "params+buffers MB", "of which teacher MB", "AdamW state MB", "footprint MB",
               "footprint ratio"]
    rows = []
    for r in results:
        for key in ("ours", "stock"):
            m = r[key]
            ours = key == "ours"
            rows.append([
                r["stage"], f"{r['ours_model']} (w={r['alignment_weight']:g})" if ours else f"LAVIS {r['lavis_class']}",
                R.fmt_s(m["step"]["median"]), R.fmt_spread(m["step"]),
                f"**{r['time_ratio']['ratio']:.3f}x**" if ours else "1",
                f"{r['time_ratio']['paired_min']:.3f}–{r['time_ratio']['paired_max']:.3f}" if ours else "",
                f"{r['time_ratio']['min_ratio']:.3f}x" if ours else "",
                R.fmt_mb(m["step_peak_bytes"]), R.fmt_mb(m["model_bytes"]), R.fmt_mb(m["teacher_bytes"]),
                R.fmt_mb(m["optimizer_state_bytes"]), R.fmt_mb(m["footprint_bytes"]),
                f"{r['footprint_ratio']:.3f}x" if ours else "1",
            ])
        t = r["teacher_forward"]
        rows.append([r["stage"], "(P-Former teacher forward alone)", R.fmt_s(t["step"]["median"]),
                     R.fmt_spread(t["step"]), f"{r['teacher_share_of_stock_step']['median']:.3f} of stock step", "", "",
                     R.fmt_mb(t["step_peak_bytes"]), "", "", "", "", ""])
    return R.markdown_table(headers, rows)


NOTES = [
    "time ratio = median step time of the plugin model / that of LAVIS's class, measured in the same rounds "
    "(interleaved, order alternating); paired ratio = min–max over rounds of the per-round ratio; ratio of minima = "
    "fastest round / fastest round (the least disturbed by other processes on a shared CPU).",
    "step peak = peak tensor memory during one untimed step above the level at its start (gradients are set to "
    "None before the step, so they are inside it); footprint = params+buffers (frozen ViT/LLM and the teacher "
    "included) + AdamW state + step peak, i.e. what one model alone would hold at its peak.",
]


def run_stages(stages, args):
    """(sizes, [result of each stage]): the backbones and teachers built once, then each stage measured."""
    created_group = MF.ensure_process_group(args.device)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
            sizes = BS.resolve_sizes(args, work)
            teachers = {}
            if {"1", "2"} & set(stages):
                teachers["1"] = teachers["2"] = MF.make_teacher(sizes, work)
            if "2t5" in stages:
                BS.add_t5(sizes, args, work)
                teachers["2t5"] = MF.make_teacher(sizes, work, llm_name=sizes["t5"],
                                                 llm_hidden_size=sizes["t5_hidden_size"], filename="pformer_t5.pth")
            init_device = args.device if args.size == "paper" else "cpu"
            with BS.random_init_backbones(init_device) as shared_llms:
                for stage in stages:
                    results.append(bench_stage(stage, sizes, teachers[stage], args))
                    shared_llms.clear()  # free the frozen OPT before the next stage
                    print(f"{STAGES[stage]['name']}: ratio {results[-1]['time_ratio']['ratio']:.3f}x", flush=True)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return sizes, results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, batch_tiny=8, batch_paper=128, warmup=2)
    parser.add_argument("--stages", default="2,1", help="comma list of 2 (OPT), 1 (Q-Former) and/or 2t5 (Flan-T5)")
    args = C.finish_args(parser.parse_args(argv))
    C.quiet()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES):
        raise SystemExit(f"--stages: choose from {sorted(STAGES)}")
    machine = R.machine_info(args.device)
    sizes, results = run_stages(stages, args)
    llms = ([sizes["opt_desc"]] if {"1", "2"} & set(stages) else []) + ([sizes["t5_desc"]] if "t5_desc" in sizes else [])
    sizes_line = (f"{args.size}, {sizes['bert_desc']}, {', '.join(llms)}, {sizes['vit_desc']}, "
                  f"Q={sizes['num_query_token']}, "
                  f"batch {args.batch}, {args.device}{', amp fp16' if args.amp else ', fp32'}")
    notes = NOTES + [f"memory: {M.MEMORY_METHOD[C.device_tag(args.device)]}."]
    payload = dict(machine=machine, sizes=sizes, sizes_line=sizes_line, args=R.args_record(args), argv=argv,
                   results=results)
    R.publish(SCRIPT, args, machine, sizes_line, table(results), notes, payload)
    return payload


if __name__ == "__main__":
    main()
