"""Metrics, tables and plots of the miniature demo (``pipeline.py``).

VQA metrics are computed from the runs' prediction files against the world's eval lists, per question
type (``vqa_scores``):

- ``accuracy``: share of correct answers;
- ``on_type``: share of answers inside the question type's answer set (world.json ``answers``);
- ``restricted_accuracy``: accuracy among the on-type answers only (correct / on-type; None when no answer
  was on-type): tells whether the answers the model does give in the right vocabulary are right;
- ``overall`` (all types), ``overall_excl_yesno`` (the headline: colour, shape, count; yes/no is reported
  apart, as the tiny LM answers it at chance even from text).
"""
import glob
import json
import math
import os
import re

import torch

from lavis_pformer.demo.run_configs import run_dir
from lavis_pformer.demo.vqa_scores import HEADLINE_TYPES, vqa_type_metrics
from lavis_pformer.synthetic.shapes_world import QUESTION_TYPES

_LOSS_RE = re.compile(r"Train: data epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\].*?\bloss: ([0-9.]+)")

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


def caption_metrics(predictions, references):
    """How well captions describe their scenes.

    ``predictions`` [{"image_id", "caption"}], ``references`` {image_id: caption}. Returns ``object_accuracy``
    (share of images whose caption names exactly the scene's (colour, shape) pairs), ``scene_accuracy`` (the
    same with each object's quadrant), ``distinct`` captions and ``images``.
    """
    from lavis_pformer.demo.probe import caption_objects

    by_id = {str(p["image_id"]): p["caption"] for p in predictions}
    objects = scenes = 0
    for image_id, reference in references.items():
        got, want = caption_objects(by_id.get(str(image_id), "")), caption_objects(reference)
        objects += {(c, s) for _, c, s in got} == {(c, s) for _, c, s in want}
        scenes += got == want
    n = len(references)
    return {"object_accuracy": objects / n if n else None, "scene_accuracy": scenes / n if n else None,
            "distinct": len(set(by_id.values())), "images": n}


def chain_metrics(ctx, chain):
    """VQA (val and test) and caption (test) metrics of one chain's runs (``chain["runs"]``: run names)."""
    world = ctx["world"]
    answer_sets = _load(os.path.join(world, "world.json"))["answers"]
    out = {"w1": chain["w1"], "w2": chain["w2"]}
    vqa_dir = os.path.realpath(run_dir(ctx, chain["runs"]["eval_vqa"]))
    for split in ("val", "test"):
        pred_path = os.path.join(vqa_dir, "result", f"{split}_vqa_result.json")
        if os.path.exists(pred_path):
            out[f"vqa_{split}"] = vqa_type_metrics(_load(pred_path), _load(os.path.join(world, f"vqa_{split}.json")),
                                                   answer_sets)
    ev = os.path.join(vqa_dir, "evaluate.txt")
    out["lavis_vqa_evaluate_txt"] = [json.loads(x) for x in open(ev) if x.strip()] if os.path.exists(ev) else []
    cap_dir = os.path.realpath(run_dir(ctx, chain["runs"]["eval_caption"]))
    for line in open(os.path.join(cap_dir, "evaluate.txt")):  # one line per split: {"<split>": {scores}}
        if line.strip():
            out.update({f"caption_{split}": v for split, v in json.loads(line).items()})
    for split in ("val", "test"):
        found = [p for p in glob.glob(os.path.join(cap_dir, "result", f"{split}_epoch*.json")) if "_rank" not in p]
        if found:
            references = {r["image_id"]: r["caption"] for r in _load(os.path.join(world, f"captions_{split}.json"))}
            out["caption_objects" + ("_val" if split == "val" else "")] = caption_metrics(_load(found[0]), references)
    scores = out["caption_test"]
    test = out.get("vqa_test", {})
    out["vqa_acc"] = test.get("overall_excl_yesno")
    out["vqa_acc_all_types"] = test.get("overall")
    out["vqa_acc_val"] = out.get("vqa_val", {}).get("overall_excl_yesno")
    out["vqa_acc_per_type"] = {t: v["accuracy"] for t, v in test.get("per_type", {}).items()}
    out["caption_object_accuracy"] = out["caption_objects"]["object_accuracy"]
    out["caption_object_accuracy_val"] = out.get("caption_objects_val", {}).get("object_accuracy")
    out["cider"] = scores.get("CIDEr")
    out["bleu4"] = scores.get("Bleu_4")
    return out


def probe_arms(ctx, chains):
    """{arm: probe_model(...)} for the stage-2 model of each chain (see probe.py), one torch thread."""
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    import lavis_pformer  # noqa: F401  (registers the models)
    from lavis_pformer.demo.probe import probe_model
    from lavis_pformer.demo.vision_pretrain import load_images

    world = ctx["world"]
    train, test = (_load(os.path.join(world, f"captions_{s}.json")) for s in ("train", "test"))
    train_images, test_images = load_images(world, train), load_images(world, test)
    threads = torch.get_num_threads()
    torch.set_num_threads(ctx["scale"].get("threads") or threads)
    try:
        out = {}
        for arm, chain in chains.items():
            cfg = OmegaConf.load(os.path.join(ctx["configs"], f"{chain['runs']['eval_vqa']}.yaml")).model
            model = registry.get_model_class(cfg.arch).from_config(cfg)
            out[arm] = probe_model(model, train_images, [r["caption"] for r in train], test_images,
                                   [r["caption"] for r in test], steps=ctx["scale"]["probe"]["steps"])
        return out
    finally:
        torch.set_num_threads(threads)


def _f(x, digits=3):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def demo_table(metrics, chance, ceiling, probes=None):
    """Markdown table: one column per arm, plus chance and the text ceiling."""
    arms = list(metrics)
    cols = arms + ["chance", "text ceiling"]
    rows = []

    def row(label, values, extra=("", "")):
        rows.append(f"| {label} | " + " | ".join(list(values) + list(extra)) + " |")

    def per(arm, t, key="accuracy"):
        return metrics[arm].get("vqa_test", {}).get("per_type", {}).get(t, {}).get(key)

    ceiling_per = ceiling.get("per_type", {})
    row("**VQA test, colour+shape+count**", [f"**{_f(metrics[a]['vqa_acc'])}**" for a in arms],
        (_f(chance.get("overall_excl_yesno")), _f(ceiling.get("overall_excl_yesno"))))
    for t in QUESTION_TYPES:
        label = f"— {t}" + (" (apart)" if t == "yesno" else "")
        row(label, [_f(per(a, t)) for a in arms], (_f(chance.get(t)), _f(ceiling_per.get(t))))
    row("on-type share, colour+shape+count", [_f(metrics[a].get("vqa_test", {}).get("on_type_excl_yesno"))
                                               for a in arms])
    row("VQA val, colour+shape+count", [_f(metrics[a].get("vqa_acc_val")) for a in arms])
    row("caption object accuracy (colours and shapes right)", [_f(metrics[a]["caption_object_accuracy"])
                                                               for a in arms])
    row("caption object accuracy, val", [_f(metrics[a].get("caption_object_accuracy_val")) for a in arms])
    row("caption scene accuracy (and their quadrants)",
        [_f(metrics[a]["caption_objects"]["scene_accuracy"]) for a in arms])
    row("distinct captions / test images",
        [f"{metrics[a]['caption_objects']['distinct']} / {metrics[a]['caption_objects']['images']}" for a in arms])
    row("caption CIDEr / BLEU-4", [f"{_f(metrics[a]['cider'])} / {_f(metrics[a]['bleu4'])}" for a in arms])
    for point, label in (("vit", "frozen ViT tokens"), ("qformer", "Q-Former outputs"), ("prompt", "LLM prompt")):
        if probes:
            row(f"probe: {label} (colour / shape)",
                [f"{_f(probes[a][point]['colour'])} / {_f(probes[a][point]['shape'])}" for a in arms],
                (f"{_f(probes[arms[0]]['all_empty']['colour'])} (all empty)", ""))
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
    return head + "\n" + "\n".join(rows)


def _chance(world_json, key="chance"):
    """Majority-answer accuracy per type on the test split (world.json ``chance``; ``chance_val`` for val),
    pooled without yes/no too."""
    ch = world_json.get(key) or {}
    per = ch.get("per_type", {})
    out = {t: (per.get(t) or {}).get("accuracy") for t in QUESTION_TYPES}
    out["overall"] = ch.get("overall")
    n = sum((per.get(t) or {}).get("questions", 0) for t in HEADLINE_TYPES)
    if n and all(out.get(t) is not None for t in HEADLINE_TYPES):
        out["overall_excl_yesno"] = sum(out[t] * per[t]["questions"] for t in HEADLINE_TYPES) / n
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(curves, path, title):
    """One panel per stage, one line per arm. ``curves``: {arm: {stage: [(step, loss)]}}."""
    plt = _pyplot()
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
    return _save(plt, fig, path)


def plot_bars(groups, path, title, errors=None, reference=None):
    """Grouped bars: ``groups`` {metric: {arm: value}}, optional ``errors`` alike, ``reference`` {label: y}."""
    plt = _pyplot()
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
    return _save(plt, fig, path)


def text_ceiling(manifest):
    """The frozen LM answering from the caption placed where the soft prompt goes (val split)."""
    q = manifest["quality"]["lm_text_ceiling_val"]
    return {"per_type": q["caption_before_bos"], "overall_excl_yesno": q["overall_excl_yesno_before_bos"]}


def write_demo_report(ctx, chains):
    """results.json (deterministic: no times), results.md, loss_curves.png, arms.png under ctx["out"]."""
    out = ctx["out"]
    world = _load(os.path.join(ctx["world"], "world.json"))
    chance = _chance(world)
    ceiling = text_ceiling(ctx["backbones"])
    metrics = {arm: chain_metrics(ctx, chain) for arm, chain in chains.items()}
    probes = probe_arms(ctx, chains)
    for arm in metrics:
        metrics[arm]["probes"] = probes[arm]
    curves = {arm: {stage.replace("stage", "stage "): loss_curve(os.path.join(ctx["logs"], f"{name}.log"))
                    for stage, name in chain["runs"].items() if stage.startswith("stage") and name}
              for arm, chain in chains.items()}
    plots = {"loss_curves": plot_losses(curves, os.path.join(out, "loss_curves.png"), "training loss per stage"),
             "arms": plot_bars(
                 {**{f"VQA {t}": {a: m["vqa_acc_per_type"].get(t) for a, m in metrics.items()}
                     for t in HEADLINE_TYPES},
                  "VQA c+s+c": {a: m["vqa_acc"] for a, m in metrics.items()},
                  "caption objects": {a: m["caption_object_accuracy"] for a, m in metrics.items()}},
                 os.path.join(out, "arms.png"), "zero-shot test results per arm",
                 reference={"chance (c+s+c)": chance.get("overall_excl_yesno"),
                            "text ceiling (c+s+c)": ceiling.get("overall_excl_yesno")})}
    table = demo_table(metrics, chance, ceiling, probes)
    scale = {k: v for k, v in ctx["scale"].items() if k != "recipe"}
    data = dict(metrics)
    data["_meta"] = {"scale": scale, "seed": ctx["seed"], "chance": chance, "chance_val": _chance(world, "chance_val"),
                     "text_ceiling": ceiling, "backbones": {k: ctx["backbones"][k] for k in ("recipe", "files",
                                                                                               "quality")},
                     "vqa_acc_definition": "test accuracy over color, shape and count questions (yes/no apart)"}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# P-Former miniature demo (seed {ctx['seed']})\n\nZero-shot VQA on the held-out test split "
                "(accuracy; yes/no apart) and captioning (test). Chance: majority answer per question type. Text "
                "ceiling: the frozen LM answering from the caption placed before its bos, where the soft prompt "
                "goes (val). Probes: linear read-out of each quadrant's colour / shape on test images.\n\n"
                f"{table}\n\nTimes: timings.json.\n\n![loss curves](loss_curves.png)\n\n![arms](arms.png)\n")
    return {"table": table, "json": data, "plots": plots}


def write_timings(out, times):
    """``timings.json``: wall times of the steps and of every run (seconds)."""
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(times, f, indent=1)


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def write_ablation_report(out, cells, seeds, scale):
    """Mean and std over seeds of each (variant, w1, w2) cell into out/results.{md,json,png}."""
    keys = ("vqa_acc", "vqa_acc_val", "caption_object_accuracy", "cider")
    data = {"seeds": seeds, "scale": scale, "cells": {}}
    rows = ["| stage 0 | w1 | w2 | " + " | ".join(f"{k} (mean ± std)" for k in keys) + " | colour / shape / count |",
            "|---|---|---|" + "---|" * (len(keys) + 1)]
    for (variant, w1, w2), runs in sorted(cells.items()):
        name = f"{variant}_w{w1}_{w2}"
        cell = {"variant": variant, "w1": w1, "w2": w2, "per_seed": runs}
        vals = []
        for k in keys:
            m, s = _mean_std([r.get(k) for r in runs])
            cell[k] = {"mean": m, "std": s}
            vals.append(f"{_f(m)} ± {_f(s)}")
        per_type = [_mean_std([r.get("vqa_acc_per_type", {}).get(t) for r in runs])[0] for t in HEADLINE_TYPES]
        data["cells"][name] = cell
        rows.append(f"| {variant} | {w1} | {w2} | " + " | ".join(vals) + " | "
                    + " / ".join(_f(x) for x in per_type) + " |")
    table = "\n".join(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
    note = ("(0, 0) trains no alignment, so the stage-0 teacher is unused: it is one run per seed, listed under "
            "both stage-0 variants.")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Ablation of the alignment weights (paper Table 4), scale `{scale}`, seeds {seeds}\n\n"
                f"vqa_acc: zero-shot test VQA accuracy over color, shape and count. {note}\n\n{table}\n\n"
                "![ablation](results.png)\n")
    groups, errors = {}, {}
    for metric in ("vqa_acc", "caption_object_accuracy"):
        for cell in data["cells"].values():
            label = f"{metric} w=({cell['w1']},{cell['w2']})"
            groups.setdefault(label, {})[cell["variant"]] = cell[metric]["mean"] or 0
            errors.setdefault(label, {})[cell["variant"]] = cell[metric]["std"] or 0
    plot_bars(groups, os.path.join(out, "results.png"), f"Table-4 grid, mean ± std over seeds {seeds}", errors=errors)
    return {"table": table, "json": data}
