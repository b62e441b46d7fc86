"""``gpu_check.md``: the GPU check's summary (``gpu_check.json``) as markdown, one section per part."""
from reporting import markdown_table

MB = 2 ** 20


def _fmt(value, spec=".3f"):
    return "" if value is None else format(value, spec)


def _pair(values, spec=".3g"):
    return f"{_fmt(values['ours'], spec)} / {_fmt(values['stock'], spec)}" if values else ""


def _losses(values):
    if not values:
        return ""
    return ", ".join(f"{k.replace('train_', '')} {v}" for k, v in values.items())


def env_section(result):
    keys = ("gpu", "gpu_memory_gib", "compute_capability", "bf16_supported", "gpu_count", "torch", "torch_cuda",
            "nccl", "cudnn", "nvidia_smi", "transformers", "lavis", "python", "java", "git", "error")
    return markdown_table(["", "value"], [[k, result[k]] for k in keys if result.get(k) is not None])


def chain_section(result):
    lines = [f"device {result['device']}, {result['launcher']}, backend {result['backend']}, run.amp {result['amp']}, "
             f"precisions {result['precisions']}; tiny backbones built in {result['tiny_build']['seconds']} s "
             f"(exit {result['tiny_build']['exit_status']}).", ""]
    rows = []
    for run in result["runs"]:
        outcome = _losses(run.get("final_losses")) or (str(run["metrics"]) if run.get("metrics") else "")
        notes = ([run["note"]] if run.get("note") else []) + (
            [f"P-Former teacher in {run['teacher_precision']}"] if run.get("teacher_precision") else [])
        if "same_epoch1_losses" in run:
            notes.append(f"epoch-1 losses {'equal' if run['same_epoch1_losses'] else 'DIFFER from'} the "
                         f"uninterrupted run's ({_losses(run['uninterrupted_epoch1_losses'])}); RNG sidecar with a "
                         f"CUDA state: {run['rng_sidecar_cuda_state']}")
        if run["exit_status"] != 0:
            notes.append("<br>".join(run.get("output_tail", [])[-4:]).replace("|", "/"))
        rows.append([run["name"], run["exit_status"], run["seconds"], outcome, "; ".join(notes)])
    lines.append(markdown_table(["run", "exit", "s", "last losses / metrics", "notes"], rows))
    if result.get("missing_runs"):
        lines += ["", f"{result['missing_runs']} runs were not started (a run before them failed)."]
    return "\n".join(lines)


def steps_section(result):
    lines = [result.get("sizes_line", " ".join(result.get("argv", []))), ""]
    rows, teacher_rows = [], []
    for r in result.get("rows", []):
        if "error" in r:
            rows.append([r["stage"], r["precision"], f"FAILED: {r['error'][:300]}"] + [""] * 7)
            continue
        rows.append([
            r["stage"], f"{r['precision']} (LLM {r['llm_precision']})" if r["llm_precision"] else r["precision"],
            f"**{r['time_ratio']:.3f}x** ({r['paired_min']:.3f}–{r['paired_max']:.3f})",
            f"{r['step_s']['ours'] * 1000:.0f} / {r['step_s']['stock'] * 1000:.0f}", _pair(r["samples_per_s"]),
            f"**{r['step_peak_ratio']:.3f}x** ({r['step_peak_bytes']['ours'] / MB:,.0f} MB)",
            f"{r['footprint_ratio']:.3f}x" + (" (no AdamW state yet)" if any(r["adamw_state_empty"].values()) else ""),
            f"{_pair(r['nonfinite_losses'], 'd')} of {_pair(r['steps'], 'd')}",
            (f"{_pair(r['skipped_steps'], 'd')}; scale {_pair(r['grad_scale'], '.0f')}"
             if r["grad_scale"]["ours"] else ""),
            f"{r['teacher_share_of_stock_step']:.3f}" + (f"; {r['stock_note']}" if r["stock_note"] else ""),
        ])
        for precision, t in (r.get("teacher_precisions") or {}).items():
            teacher_rows.append([r["stage"], r["precision"], precision, f"{t['teacher_bytes'] / MB:,.0f}",
                                 f"{t['footprint_ratio']:.4f}x", f"{t['loss_align']:.6g}",
                                 _fmt(t.get("loss_align_rel_change"), ".2e"), _fmt(t.get("grad_rel_change"), ".2e")])
    lines.append(markdown_table(
        ["stage", "step precision", "plugin / LAVIS step time (paired min–max)", "ms plugin / LAVIS",
         "samples/s plugin / LAVIS", "step peak memory plugin / LAVIS", "footprint ratio",
         "non-finite losses plugin / LAVIS", "GradScaler: skipped steps, final scale (plugin / LAVIS)",
         "teacher forward / LAVIS step"], rows))
    if teacher_rows:
        lines += ["", "The P-Former teacher's precision (same batch and weights; changes relative to fp32):",
                  "", markdown_table(["stage", "step precision", "teacher", "teacher MB", "footprint / LAVIS",
                                      "loss_align", "loss_align change", "gradient change"], teacher_rows)]
    return "\n".join(lines)


def bench_section(result):
    rows = []
    inference = result.get("inference", {})
    if "error" in inference:
        rows.append(["inference", f"FAILED: {inference['error'][:300]}", "", ""])
    elif inference:
        for task in ("generate", "vqa"):
            r = inference[task]
            rows.append([f"{task}, plugin / LAVIS", f"**{r['time_ratio']:.3f}x**", f"{r['peak_ratio']:.3f}x",
                         f"same outputs: {r['same_outputs']}; no P-Former in memory: {inference['pformer_free']}"])
    vq = result.get("vq", {})
    if "error" in vq:
        rows.append(["VQ", f"FAILED: {vq['error'][:300]}", "", ""])
    for r in vq.get("rows", []):
        rows.append([f"VQ chunked / dense, V = {r['vocab']:,}", f"**{r['time_ratio']:.3f}x**",
                     f"{r['peak_ratio']:.3f}x", f"same nearest rows: {r['same_rows_fraction']:.4f}"])
    return markdown_table(["benchmark", "time ratio", "peak memory ratio", ""], rows)


SECTIONS = {"env": env_section, "chain": chain_section, "steps": steps_section, "bench": bench_section}


def markdown(summary):
    from gpu_check import TITLES

    total = summary.get("total_seconds", 0)
    lines = [f"# GPU check{' (dry run on the CPU)' if summary['dry_run'] else ''}", "",
             f"Started {summary['started']}; total {int(total // 60)} min {total % 60:.0f} s. Files: {summary['out']}.",
             "", markdown_table(["part", "status", "s", "limit s"],
                                [[TITLES[n], e["status"], e["seconds"], e["limit_s"]]
                                 for n, e in summary["parts"].items()])]
    for name, entry in summary["parts"].items():
        lines += ["", f"## {TITLES[name]}: {entry['status']}", ""]
        if entry["result"] is not None:
            try:
                lines.append(SECTIONS[name](entry["result"]))
            except (KeyError, TypeError, ValueError) as e:  # a part cut off mid-way: its raw result is in the json
                lines.append(f"(incomplete result, see {name}.json: {type(e).__name__}: {e})")
        if entry["status"] != "ok":
            lines += ["", f"End of {name}.log:", "", "```", *entry.get("log_tail", []), "```"]
    return "\n".join(lines) + "\n"
