"""Metrics, tables and plots of the miniature demo (``pipeline.py``).

VQA metrics are computed from the runs' prediction files against the world's eval lists, per question
type, with LAVIS's answer normalisation (the world's ground truth has 10 identical answers, so the VQA
score of a question is 1 for a match and 0 otherwise; the overall figure equals LAVIS's ``agg_metrics``/100):

- ``accuracy``: share of correct answers;
- ``on_type``: share of answers inside the question type's answer set (world.json ``answers``);
- ``restricted_accuracy``: accuracy among the on-type answers only (correct / on-type; None when no answer
  was on-type): tells whether the answers the model does give in the right vocabulary are right;
- ``overall`` (all types), ``overall_excl_yesno`` (the headline: colour, shape, count; yes/no is reported
  apart, as the tiny LM answers it at chance even from text).
"""
import json
import math
import os
import re

QUESTION_TYPES = ("color", "shape", "count", "yesno")
HEADLINE_TYPES = ("color", "shape", "count")
_LOSS_RE = re.compile(r"Train: data epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\].*?\bloss: ([0-9.]+)")

_VQA_EVAL = None


def normalize_answer(answer):
    """LAVIS's VQA answer normalisation (punctuation, number words -> digits, articles)."""
    global _VQA_EVAL
    if _VQA_EVAL is None:
        try:
            from lavis.common.vqa_tools.vqa_eval import VQAEval

            _VQA_EVAL = VQAEval()
        except Exception:  # pragma: no cover - LAVIS missing: a plain fallback
            _VQA_EVAL = False
    text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
    if _VQA_EVAL:
        text = _VQA_EVAL.processDigitArticle(_VQA_EVAL.processPunctuation(text))
    return text.strip()


def vqa_type_metrics(predictions, items, answer_sets):
    """Metrics of ``predictions`` ([{question_id, answer}]) on ``items`` ([{question_id, answer, question_type}]).

    ``answer_sets``: {question_type: [answers]}. Returns {"overall", "overall_excl_yesno", "on_type",
    "questions", "per_type": {type: {"accuracy", "restricted_accuracy", "on_type", "questions"}}}.
    """
    pred = {int(p["question_id"]): normalize_answer(p["answer"]) for p in predictions}
    sets = {t: {normalize_answer(a) for a in v} for t, v in answer_sets.items()}
    per = {}
    for it in items:
        gt = it["answer"][0] if isinstance(it["answer"], list) else it["answer"]
        p = pred.get(int(it["question_id"]), "")
        t = it["question_type"]
        d = per.setdefault(t, {"n": 0, "hit": 0, "on": 0, "on_hit": 0})
        hit = p == normalize_answer(gt)
        on = p in sets.get(t, ())
        d["n"] += 1
        d["hit"] += hit
        d["on"] += on
        d["on_hit"] += hit and on
    out = {"per_type": {}}
    for t in [t for t in QUESTION_TYPES if t in per] + [t for t in per if t not in QUESTION_TYPES]:
        d = per[t]
        out["per_type"][t] = {
            "accuracy": d["hit"] / d["n"],
            "restricted_accuracy": d["on_hit"] / d["on"] if d["on"] else None,
            "on_type": d["on"] / d["n"],
            "questions": d["n"],
        }

    def pooled(types, key):
        ds = [per[t] for t in types if t in per]
        n = sum(d["n"] for d in ds)
        return sum(d[key] for d in ds) / n if n else None

    out["overall"] = pooled(list(per), "hit")
    out["overall_excl_yesno"] = pooled(HEADLINE_TYPES, "hit")
    out["on_type"] = pooled(list(per), "on")
    out["on_type_excl_yesno"] = pooled(HEADLINE_TYPES, "on")
    out["questions"] = sum(d["n"] for d in per.values())
    return out


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def loss_curve(log_path, run_dir=None):
    """[(step, loss)] from a run's stdout log (LAVIS MetricLogger lines, every ``log_freq`` steps), else from
    ``run_dir/log.txt`` epoch stats ([(epoch + 1, train_loss)])."""
    points = []
    if log_path and os.path.exists(log_path):
        for line in open(log_path, encoding="utf-8", errors="replace"):
            m = _LOSS_RE.search(line)
            if m:
                epoch, i, n, loss = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))
                points.append((epoch * n + i, loss))
    if points or not run_dir:
        return points
    path = os.path.join(run_dir, "log.txt")
    if os.path.exists(path):
        for line in open(path):
            try:
                stats = json.loads(line)
            except ValueError:
                continue
            if "train_loss" in stats:
                points.append((stats.get("epoch", len(points)) + 1, float(stats["train_loss"])))
    return points


def chain_metrics(ctx, chain):
    """VQA (val and test) and caption (test) metrics of one arm's runs."""
    world = ctx["world"]
    answer_sets = _load(os.path.join(world, "world.json"))["answers"]
    out = {"w1": chain["w1"], "w2": chain["w2"], "time_s": chain.get("time_s", {})}
    vqa_dir = chain["runs"]["eval_vqa"]
    for split in ("val", "test"):
        pred_path = os.path.join(vqa_dir, "result", f"{split}_vqa_result.json")
        if os.path.exists(pred_path):
            out[f"vqa_{split}"] = vqa_type_metrics(_load(pred_path), _load(os.path.join(world, f"vqa_{split}.json")),
                                                   answer_sets)
    lavis_lines = []
    ev = os.path.join(vqa_dir, "evaluate.txt")
    if os.path.exists(ev):
        lavis_lines = [json.loads(x) for x in open(ev) if x.strip()]
    out["lavis_vqa_evaluate_txt"] = lavis_lines
    cap = os.path.join(chain["runs"]["eval_caption"], "evaluate.txt")
    scores = json.loads(open(cap).read().splitlines()[-1])["test"]
    out["caption_test"] = scores
    test = out.get("vqa_test", {})
    out["vqa_acc"] = test.get("overall_excl_yesno")
    out["vqa_acc_all_types"] = test.get("overall")
    out["vqa_acc_val"] = out.get("vqa_val", {}).get("overall_excl_yesno")
    out["cider"] = scores.get("CIDEr")
    out["bleu4"] = scores.get("Bleu_4")
    return out


def _f(x, digits=3):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def demo_table(metrics, chance, ceiling):
    """Markdown table: one column per arm, plus chance and the text ceiling."""
    arms = list(metrics)
    cols = arms + ["chance", "text ceiling (LM reads the caption)"]
    rows = []

    def row(label, values):
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    def per(arm, t, key):
        return metrics[arm].get("vqa_test", {}).get("per_type", {}).get(t, {}).get(key)

    row("VQA test accuracy, color+shape+count", [_f(metrics[a]["vqa_acc"]) for a in arms]
        + [_f(chance.get("overall_excl_yesno")), _f(ceiling.get("overall_excl_yesno"))])
    for t in QUESTION_TYPES:
        label = f"— {t}" + (" (reported apart)" if t == "yesno" else "")
        row(label, [_f(per(a, t, "accuracy")) for a in arms]
            + [_f(chance.get(t)), _f(ceiling.get("per_type", {}).get(t, {}).get("accuracy"))])
    row("VQA test accuracy, all four types", [_f(metrics[a].get("vqa_acc_all_types")) for a in arms]
        + [_f(chance.get("overall")), _f(ceiling.get("overall"))])
    for t in QUESTION_TYPES:
        row(f"restricted accuracy — {t} (correct / on-type)", [_f(per(a, t, "restricted_accuracy")) for a in arms]
            + ["", ""])
    for t in QUESTION_TYPES:
        row(f"on-type share — {t}", [_f(per(a, t, "on_type")) for a in arms]
            + ["", _f(ceiling.get("per_type", {}).get(t, {}).get("on_type"))])
    row("VQA val accuracy, color+shape+count", [_f(metrics[a].get("vqa_acc_val")) for a in arms] + ["", ""])
    row("caption test CIDEr", [_f(metrics[a]["cider"]) for a in arms] + ["", ""])
    row("caption test BLEU-4", [_f(metrics[a]["bleu4"]) for a in arms] + ["", ""])
    for stage in ("stage0", "stage1", "stage2", "eval_vqa", "eval_caption"):
        row(f"time {stage} (s)", [_f(metrics[a].get("time_s", {}).get(stage), 0) for a in arms] + ["", ""])
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
    return head + "\n" + "\n".join(rows)


def _chance(world_json):
    """Majority-answer accuracy per type on the test split (world.json ``chance``), pooled without yes/no too."""
    ch = world_json.get("chance") or {}
    per = ch.get("per_type", {})
    out = {t: (per.get(t) or {}).get("accuracy") for t in QUESTION_TYPES}
    out["overall"] = ch.get("overall")
    n = sum((per.get(t) or {}).get("questions", 0) for t in HEADLINE_TYPES)
    if n and all(out.get(t) is not None for t in HEADLINE_TYPES):
        out["overall_excl_yesno"] = sum(out[t] * per[t]["questions"] for t in HEADLINE_TYPES) / n
    return out


def plot_losses(curves, path, title):
    """One panel per stage, one line per arm. ``curves``: {arm: {stage: [(step, loss)]}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({s for c in curves.values() for s in c})
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.5 * max(1, len(stages)), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for arm, c in curves.items():
            pts = c.get(stage)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=arm, marker="." if len(pts) < 15 else None)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("total training loss")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(groups, path, title, errors=None, reference=None):
    """Grouped bars: ``groups`` {metric: {arm: value}}, optional ``errors`` alike, ``reference`` {label: y}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(groups)
    arms = list(dict.fromkeys(a for g in groups.values() for a in g))
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, len(arms)) / 2), 3.8))
    for i, arm in enumerate(arms):
        xs = [m + (i - (len(arms) - 1) / 2) * width for m in range(len(metrics))]
        ys = [groups[k].get(arm) or 0.0 for k in metrics]
        err = [(errors or {}).get(k, {}).get(arm) or 0.0 for k in metrics] if errors else None
        ax.bar(xs, ys, width, label=arm, yerr=err, capsize=3 if err else 0)
    for label, y in (reference or {}).items():
        if y is not None:
            ax.axhline(y, linestyle="--", linewidth=0.8, color="gray")
            ax.text(len(metrics) - 0.5, y, label, fontsize=7, va="bottom", ha="right", color="gray")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_demo_report(ctx, results, step_times):
    """results.{md,json}, loss_curves.png, arms.png under ctx["out"]; returns {"table", "json", ...}."""
    out = ctx["out"]
    world = _load(os.path.join(ctx["world"], "world.json"))
    lm = ctx.get("lm_report") or {}
    ceiling = lm.get("text_ceiling", {})
    chance = _chance(world)
    metrics = {arm: chain_metrics(ctx, chain) for arm, chain in results.items()}
    curves = {}
    for arm, chain in results.items():
        c = {}
        if chain.get("stage0"):
            c["stage 0"] = loss_curve(os.path.join(ctx["logs"], f"{arm}_stage0.log"), chain["stage0"])
        for s in ("stage1", "stage2"):
            c[s.replace("stage", "stage ")] = loss_curve(os.path.join(ctx["logs"], f"{arm}_{s}.log"), chain["runs"][s])
        curves[arm] = c
    plots = {"loss_curves": plot_losses(curves, os.path.join(out, "loss_curves.png"), "training loss per stage"),
             "arms": plot_bars(
                 {**{f"VQA {t}": {a: m.get("vqa_test", {}).get("per_type", {}).get(t, {}).get("accuracy")
                                 for a, m in metrics.items()} for t in HEADLINE_TYPES},
                  "VQA c+s+c": {a: m["vqa_acc"] for a, m in metrics.items()},
                  "CIDEr/10": {a: (m["cider"] or 0) / 10 for a, m in metrics.items()}},
                 os.path.join(out, "arms.png"), "zero-shot test results per arm",
                 reference={"chance (c+s+c)": chance.get("overall_excl_yesno"),
                            "text ceiling (c+s+c)": ceiling.get("overall_excl_yesno")})}
    table = demo_table(metrics, chance, ceiling)
    vit_report_path = str(ctx.get("vit", "")) + ".json"
    vision = _load(vit_report_path) if os.path.exists(vit_report_path) else {}
    data = dict(metrics)
    data["_meta"] = {"scale": ctx["scale_name"], "seed": ctx["seed"], "sizes": ctx["scale"], "chance": chance,
                     "text_ceiling": ceiling, "lm": {k: lm.get(k) for k in ("steps", "sizes", "time_s", "overall",
                                                                            "overall_excl_yesno")},
                     "vision": {k: vision.get(k) for k in ("vit_config", "steps", "images", "val_quadrant_accuracy",
                                                            "time_s")},
                     "step_times_s": step_times, "plots": plots,
                     "vqa_acc_definition": "test accuracy over color, shape and count questions (yes/no apart)"}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    total = sum(v for k, v in step_times.items() if "/" in k or k in ("world", "lm", "backbones"))
    md = [f"# P-Former miniature demo (scale `{ctx['scale_name']}`, seed {ctx['seed']})", "",
          "Zero-shot VQA on the held-out test split (accuracy; yes/no reported apart) and captioning (test). "
          "Chance: majority answer per question type (world.json). Text ceiling: the frozen LM given the caption "
          "as text (train_lm's report, val split). Restricted accuracy: correct among on-type answers.", "",
          table, ""]
    acc = vision.get("val_quadrant_accuracy")
    if acc:
        md += [f"Frozen ViT (pretrained on {vision.get('images')} unpaired images): val quadrant accuracy colour "
               f"{acc['colour']:.3f}, shape {acc['shape']:.3f}. Frozen LM: {lm.get('steps')} steps.", ""]
    md += ["## Step times (s)", "", "| step | seconds |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in step_times.items()]
    md += [f"| total (sum of steps) | {total:.0f} |", "", "![loss curves](loss_curves.png)", "", "![arms](arms.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    return {"table": table, "json": data, "plots": plots}


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def write_ablation_report(out, cells, seeds, step_times, scale):
    """Mean and std over seeds of each (variant, w1, w2) cell into out/results.{md,json,png}."""
    keys = ("vqa_acc", "vqa_acc_val", "vqa_acc_all_types", "cider", "bleu4")
    data = {"seeds": seeds, "scale": scale, "step_times_s": step_times, "cells": {}}
    rows = ["| stage 0 | w1 | w2 | " + " | ".join(f"{k} (mean ± std)" for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys)]
    for (variant, w1, w2), runs in sorted(cells.items()):
        name = f"{variant}_w{w1}_{w2}"
        cell = {"variant": variant, "w1": w1, "w2": w2, "per_seed": runs}
        vals = []
        for k in keys:
            m, s = _mean_std([r.get(k) for r in runs])
            cell[k] = {"mean": m, "std": s}
            vals.append(f"{_f(m)} ± {_f(s)}")
        data["cells"][name] = cell
        rows.append(f"| {variant} | {w1} | {w2} | " + " | ".join(vals) + " |")
    table = "\n".join(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    note = ("(0, 0) trains no alignment, so the stage-0 teacher is unused: it is one run per seed, listed under "
            "both stage-0 variants.")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Ablation of the alignment weights (paper Table 4), scale `{scale}`, seeds {seeds}\n\n"
                f"vqa_acc: zero-shot test VQA accuracy over color, shape and count. {note}\n\n{table}\n\n"
                "![ablation](results.png)\n")
    groups = {}
    errors = {}
    for metric in ("vqa_acc", "cider"):
        for name, cell in data["cells"].items():
            label = f"{metric} w=({cell['w1']},{cell['w2']})"
            groups.setdefault(label, {})[cell["variant"]] = (cell[metric]["mean"] or 0) / (10 if metric == "cider" else 1)
            errors.setdefault(label, {})[cell["variant"]] = (cell[metric]["std"] or 0) / (10 if metric == "cider" else 1)
    plot_bars(groups, os.path.join(out, "results.png"), f"Table-4 grid, mean ± std over seeds {seeds} (CIDEr/10)",
              errors=errors)
    return {"table": table, "json": data}
