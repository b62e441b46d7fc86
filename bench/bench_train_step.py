"""What the alignment loss costs per training step: the plugin's stage-1/2 models vs LAVIS's own classes.

Stage 2: ``blip2_opt_pformer`` (alignment_weight 100, with its frozen P-Former teacher) vs LAVIS's
``Blip2OPT``; stage 2t5: ``blip2_t5_pformer`` (w = 100, a P-Former for the T5) vs LAVIS's ``Blip2T5``, both fed
the same prefix / suffix split of each caption; stage 1: ``blip2_qformer_pformer`` (w = 10) vs LAVIS's
``Blip2Qformer``. The pair (``train_step_pair``): LAVIS's class with only its hard-coded backbones redirected,
given the plugin model's weights and sharing its frozen ViT and LLM objects, so both run the same weights on the
same batch. One step = zero_grad, forward under the step precision's autocast, backward, AdamW step (through a
GradScaler under fp16, as LAVIS's runner with ``run.amp``); each step precision of ``--precisions`` is measured on
the same pair, and ``--teacher-precisions`` compares the P-Former teacher in fp32 / fp16 / bf16
(``teacher_precision``).

Also timed in the same rounds: the teacher's forward alone (``teacher_prompt``), to show where the
difference comes from.

    python bench/bench_train_step.py                                      # tiny, CPU
    python bench/bench_train_step.py --device cuda --precisions fp16,bf16 # paper sizes
    python bench/bench_train_step.py --stages 2t5                         # the Flan-T5 twin of stage 2
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import backbone_sizes as BS  # noqa: E402
import measure as M  # noqa: E402
import model_factories as MF  # noqa: E402
import reporting as R  # noqa: E402
import teacher_precision  # noqa: E402
import train_step_pair as TP  # noqa: E402

import torch  # noqa: E402

from lavis_pformer.tasks import TEACHER_PRECISION_BY_DEVICE  # noqa: E402

SCRIPT = "bench_train_step"


def measure_pair(stage, ours, stock, samples, precision, args):
    """Time and memory of one step of each model of the pair at one step precision, side by side."""
    step_ours, step_stock = (TP.TrainStep(m, samples, precision, args.device) for m in (ours, stock))
    stock_note = TP.make_stock_run(stage, stock, step_stock)

    def teacher_forward():
        with TP.step_autocast(precision, args.device):
            ours.teacher_prompt(ours.alignment_texts(samples))

    times = M.time_interleaved({"ours": step_ours, "stock": step_stock, "teacher": teacher_forward},
                               args.repeats, args.warmup, args.device)
    peaks = {key: M.peak_memory(step, args.device, before=lambda s=step: s.optimizer.zero_grad(set_to_none=True))
             for key, step in (("ours", step_ours), ("stock", step_stock))}
    peaks["teacher"] = M.peak_memory(teacher_forward, args.device)
    spec = TP.STAGES[stage]
    result = dict(stage=spec["name"], ours_model=spec["ours"], lavis_class=spec["lavis"], precision=precision,
                  llm_precision=TP.llm_precision(stage, precision),
                  teacher_precision=TP.precision_name(next(ours.pformer_teacher.parameters()).dtype),
                  alignment_weight=spec["weight"], stock_note=stock_note, times_s=times,
                  memory_method=M.MEMORY_METHOD[C.device_tag(args.device)])
    for key, model, step in (("ours", ours, step_ours), ("stock", stock, step_stock)):
        model_bytes, opt_bytes = M.module_bytes(model), M.optimizer_state_bytes(step.optimizer)
        result[key] = dict(
            step=M.summarize(times[key]), samples_per_s=args.batch / statistics.median(times[key]),
            step_peak_bytes=peaks[key], model_bytes=model_bytes,
            trainable_bytes=M.module_bytes(model, trainable_only=True), optimizer_state_bytes=opt_bytes,
            teacher_bytes=M.module_bytes(getattr(model, "pformer_teacher", None)), params=M.param_count(model),
            trainable_params=M.param_count(model, trainable_only=True),
            footprint_bytes=model_bytes + opt_bytes + peaks[key], health=step.health(),
        )
    result["last_loss"] = {k: result[k]["health"]["last_loss"] for k in ("ours", "stock")}
    result["nonfinite_losses"] = sum(result[k]["health"]["nonfinite_losses"] for k in ("ours", "stock"))
    result["teacher_forward"] = dict(step=M.summarize(times["teacher"]), step_peak_bytes=peaks["teacher"])
    result["time_ratio"] = M.ratio_summary(times["ours"], times["stock"])
    result["teacher_share_of_stock_step"] = M.summarize([t / s for t, s in zip(times["teacher"], times["stock"])])
    result["footprint_ratio"] = result["ours"]["footprint_bytes"] / result["stock"]["footprint_bytes"]
    result["step_peak_ratio"] = peaks["ours"] / peaks["stock"]
    return result, step_ours


def bench_stage(stage, sizes, teacher, args, on_result):
    """Build the pair once; measure it at each step precision (``on_result`` after each); the teacher
    precisions are compared at the first one."""
    ours, stock, extra_trainable = TP.build_pair(stage, sizes, teacher, args.teacher_precisions[0])
    ours.to(args.device)
    stock.to(args.device)
    samples = {"image": MF.images(args.batch, sizes["image_size"], args.device),
               "text_input": MF.captions(args.batch)}
    if stage == "2t5":  # the same prefix / suffix split for both models (LAVIS's Blip2T5 needs text_output)
        words = [c.split() for c in samples["text_input"]]
        samples = dict(samples, text_input=[" ".join(w[: len(w) // 2]) for w in words],
                       text_output=[" ".join(w[len(w) // 2:]) for w in words])
    for i, precision in enumerate(args.precisions):
        try:
            TP.set_llm_precision(ours, stage, precision)
            result, step_ours = measure_pair(stage, ours, stock, samples, precision, args)
            result["extra_trainable"] = extra_trainable
            if i == 0 and len(args.teacher_precisions) > 1:
                result["teacher_precisions"] = teacher_precision.compare(
                    ours, step_ours, result["stock"]["footprint_bytes"], teacher, args.teacher_precisions,
                    precision, args.device)
            del step_ours
        except Exception as e:  # noqa: BLE001  (one failing precision must not cost the others' results)
            if not args.keep_going:
                raise
            result = failure(stage, precision, e)
        on_result(result)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def failure(stage, precision, error):
    """The result of a measurement that failed (``--keep-going``)."""
    result = dict(stage=TP.STAGES[stage]["name"], precision=precision, error=f"{type(error).__name__}: {error}")
    print(f"{result['stage']} {precision}: FAILED {result['error'][:300]}", flush=True)
    return result


def table(results):
    headers = ["stage", "step precision", "model", "step ms (median)", "IQR (min–max) ms", "samples/s", "time ratio",
               "paired ratio min–max", "ratio of minima", "step peak MB", "params+buffers MB", "of which teacher MB",
               "AdamW state MB", "footprint MB", "footprint ratio", "non-finite losses", "steps skipped (GradScaler)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["stage"], r["precision"], f"FAILED: {r['error'][:300]}"] + [""] * (len(headers) - 3))
            continue
        for key in ("ours", "stock"):
            m = r[key]
            ours = key == "ours"
            model = (f"{r['ours_model']} (w={r['alignment_weight']:g}, teacher {r['teacher_precision']})" if ours
                     else f"LAVIS {r['lavis_class']}" + (" (prompt in fp32, see notes)" if r["stock_note"] else ""))
            rows.append([
                r["stage"], f"{r['precision']} (LLM {r['llm_precision']})" if r["llm_precision"] else r["precision"],
                model, R.fmt_s(m["step"]["median"]), R.fmt_spread(m["step"]), f"{m['samples_per_s']:.3g}",
                f"**{r['time_ratio']['ratio']:.3f}x**" if ours else "1",
                f"{r['time_ratio']['paired_min']:.3f}–{r['time_ratio']['paired_max']:.3f}" if ours else "",
                f"{r['time_ratio']['min_ratio']:.3f}x" if ours else "",
                R.fmt_mb(m["step_peak_bytes"]), R.fmt_mb(m["model_bytes"]), R.fmt_mb(m["teacher_bytes"]),
                R.fmt_mb(m["optimizer_state_bytes"]) + (" (none yet)" if m["health"]["adamw_state_empty"] else ""),
                R.fmt_mb(m["footprint_bytes"]), f"{r['footprint_ratio']:.3f}x" if ours else "1",
                f"{m['health']['nonfinite_losses']} of {m['health']['steps']}",
                f"{m['health']['skipped_steps']} of {m['health']['steps']}" if step_scaled(r) else "",
            ])
        t = r["teacher_forward"]
        rows.append([r["stage"], r["precision"], "(P-Former teacher forward alone)", R.fmt_s(t["step"]["median"]),
                     R.fmt_spread(t["step"]), "", f"{r['teacher_share_of_stock_step']['median']:.3f} of stock step",
                     "", "", R.fmt_mb(t["step_peak_bytes"])] + [""] * 7)
    return R.markdown_table(headers, rows)


def step_scaled(result):
    return TP.STEP_PRECISIONS[result["precision"]]["scaler"]


def teacher_table(results):
    """The teacher precisions compared (``--teacher-precisions``), or "" when none were."""
    headers = ["stage", "step precision", "teacher", "teacher MB", "footprint MB", "footprint / LAVIS",
               "loss_align", "change vs fp32", "gradient change vs fp32"]
    rows = []
    for r in results:
        for precision, t in r.get("teacher_precisions", {}).items():
            rows.append([r["stage"], r["precision"], precision, R.fmt_mb(t["teacher_bytes"]),
                         R.fmt_mb(t["footprint_bytes"]), f"**{t['footprint_ratio']:.4f}x**", f"{t['loss_align']:.6g}",
                         f"{t['loss_align_rel_change']:.2e}" if "loss_align_rel_change" in t else "",
                         f"{t['grad_rel_change']:.2e}" if "grad_rel_change" in t else ""])
    return R.markdown_table(headers, rows) if rows else ""


NOTES = [
    "time ratio = median step time of the plugin model / that of LAVIS's class, measured in the same rounds "
    "(interleaved, order alternating); paired ratio = min–max over rounds of the per-round ratio; ratio of minima = "
    "fastest round / fastest round (the least disturbed by other processes on a shared CPU).",
    "step peak = peak tensor memory during one untimed step above the level at its start (gradients are set to "
    "None before the step, so they are inside it); footprint = params+buffers (frozen ViT/LLM and the teacher "
    "included) + AdamW state + step peak, i.e. what one model alone would hold at its peak.",
    "step precision: fp32 (no autocast); fp16 (fp16 autocast + GradScaler, as LAVIS's runner with run.amp); bf16 "
    "(bf16 autocast, bf16 LLM). Non-finite losses and GradScaler-skipped steps: over every step each model ran "
    "(warm-up, timed, memory); AdamW state '(none yet)': every step so far was skipped, so the footprint lacks it.",
    "teacher table: loss_align and its gradient on every trainable tensor, same batch and weights, relative to the "
    "fp32 teacher (|L - L32| / |L32|, ||g - g32|| / ||g32||).",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, batch_tiny=8, batch_paper=128, warmup=2)
    parser.add_argument("--stages", default="2,1", help="comma list of 2 (OPT), 1 (Q-Former) and/or 2t5 (Flan-T5)")
    parser.add_argument("--precisions", default=None,
                        help="comma list of step precisions fp32, fp16 (autocast + GradScaler), bf16 (default: fp16 "
                             "with --amp, else fp32), each measured on the same pair")
    parser.add_argument("--teacher-precisions", default=None,
                        help="comma list of P-Former teacher precisions (fp32, fp16, bf16): the first in the timed "
                             "pair, all compared for footprint, loss_align and gradient (default: the training "
                             "default of the device, fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a step precision that fails is recorded and the others still run")
    parser.add_argument("--frozen-in-files", action="store_true",
                        help="CPU, stages 1 and 2 (OPT): keep the frozen ViT and LLM in files mapped into memory "
                             "(page cache, not process memory), so that the paper sizes fit a small machine; the "
                             "measured bytes are the same")
    args = C.finish_args(parser.parse_args(argv))
    args.stages = split_choices(args.stages, TP.STAGES, "--stages")
    if args.frozen_in_files and (args.device != "cpu" or "2t5" in args.stages):
        raise SystemExit("--frozen-in-files: CPU runs of stages 1 and 2 only (LAVIS's Blip2T5 copies its T5 to bf16)")
    args.precisions = split_choices(args.precisions or ("fp16" if args.amp else "fp32"), TP.STEP_PRECISIONS,
                                    "--precisions")
    default_teacher = TEACHER_PRECISION_BY_DEVICE[C.device_tag(args.device)]
    args.teacher_precisions = split_choices(args.teacher_precisions or default_teacher, TP.DTYPES,
                                            "--teacher-precisions")
    return args


def split_choices(text, choices, flag):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - set(choices):
        raise SystemExit(f"{flag}: a comma list of {', '.join(sorted(choices))}, got {text!r}")
    return values


def run_stages(args, on_result):
    """sizes; the backbones and teachers built once, then each stage measured (``on_result(result)`` each time)."""
    stages = args.stages
    created_group = MF.ensure_process_group(args.device)
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
            files_dir = os.path.join(work, "frozen") if args.frozen_in_files else None
            with BS.random_init_backbones(init_device, files_dir) as shared_llms:
                for stage in stages:
                    try:
                        bench_stage(stage, sizes, teachers[stage], args, on_result)
                    except Exception as e:  # noqa: BLE001  (e.g. out of memory while building the pair)
                        if not args.keep_going:
                            raise
                        on_result(failure(stage, "/".join(args.precisions), e))
                    shared_llms.clear()  # free the frozen LLM before the next stage
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return sizes


def main(argv=None, on_result=None):
    """Measure, print and write the results; ``on_result(payload)`` after each (stage, precision) as well."""
    args = parse_args(argv)
    C.quiet()
    machine = R.machine_info(args.device)
    results = []
    payload = dict(machine=machine, args=R.args_record(args), argv=argv, results=results, complete=False)

    def record(result):
        results.append(result)
        if "error" not in result:
            print(f"{result['stage']} {result['precision']}: ratio {result['time_ratio']['ratio']:.3f}x", flush=True)
        R.write_json(SCRIPT, args, payload)  # what is measured so far survives a crash or a timeout
        if on_result is not None:
            on_result(payload)

    sizes = run_stages(args, record)
    llms = ([sizes["opt_desc"]] if {"1", "2"} & set(args.stages) else []) + \
        ([sizes["t5_desc"]] if "t5_desc" in sizes else [])
    sizes_line = (f"{args.size}, {sizes['bert_desc']}, {', '.join(llms)}, {sizes['vit_desc']}, "
                  f"Q={sizes['num_query_token']}, batch {args.batch}, {args.device}, "
                  f"step precisions {'/'.join(args.precisions)}, teacher {'/'.join(args.teacher_precisions)}")
    notes = NOTES + [f"memory: {M.MEMORY_METHOD[C.device_tag(args.device)]}."]
    notes += [f"{r['stage']} {r['precision']}: {r['stock_note']}" for r in results if r.get("stock_note")]
    payload.update(sizes=sizes, sizes_line=sizes_line, complete=True)
    tables = "\n\n".join(t for t in (table(results), teacher_table(results)) if t)
    R.publish(SCRIPT, args, machine, sizes_line, tables, notes, payload)
    return payload


if __name__ == "__main__":
    main()
