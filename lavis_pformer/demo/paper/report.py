"""``results.json`` and ``results.md`` of ``make paper``: per table the paper's numbers, the miniature's mean ±
standard deviation over the worlds with each world's value, the claims' directions, the teachers' ceilings and
what each table cost."""
import json
import math
import os

from lavis_pformer.demo.paper.scoring import mean_std


def _f(x, digits=3):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x):
    return "—" if x is None else f"{x:+.3f}"


def _cell(cell):
    """"mean ± std (w0 / w1 / ...)" of one (arm, metric) cell."""
    per = " / ".join(_f(v) for v in cell["per_world"].values())
    return f"{_f(cell['mean'])} ± {_f(cell['std'])} ({per})"


def directions_table(tables):
    """One row per claim: the paper's numbers, the miniature's difference and its direction."""
    rows = ["| table | claim | paper | miniature: difference mean ± std (per world) | direction |",
            "|---|---|---|---|---|"]
    for key, t in tables.items():
        for c in t["claims"]:
            per = " / ".join(_signed(r["difference"]) for r in c["per_world"].values())
            rows.append(f"| {key} | {c['label']} ({c['metric']}) | {c['paper']} | {_signed(c['difference_mean'])} ± "
                        f"{_f(c['difference_std'])} ({per}) | **{c['direction']}** |")
    return "\n".join(rows)


def table_markdown(key, table, metric_labels):
    """The arms x metrics table of one paper table."""
    metrics = list(metric_labels)
    rows = [f"| arm | " + " | ".join(metric_labels[m] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, cells in table["cells"].items():
        rows.append(f"| {arm} | " + " | ".join(_cell(cells[m]) for m in metrics) + " |")
    return "\n".join(rows)


def ceilings_table(ceilings, per_world):
    """Each ceiling (mean ± std over worlds, per world) on test and test_ood, beside the VQA its arm reached."""
    rows = ["| the frozen LLM reads | test c+s+c | — colour / shape / count | test_ood c+s+c | its arm | the arm's VQA "
            "test / test_ood |", "|---|---|---|---|---|---|"]

    def stat(values):
        m, s = mean_std(values)
        return f"{_f(m)} ± {_f(s)} (" + " / ".join(_f(v) for v in values) + ")"

    for label, ceiling in ceilings.items():
        worlds = ceiling["per_world"]
        overall = {split: [(w.get(split) or {}).get("overall_excl_yesno") for w in worlds.values()]
                   for split in ("test", "test_ood")}
        per_type = " / ".join(_f(mean_std([((w.get("test") or {}).get("per_type", {}).get(t) or {}).get("accuracy")
                                            for w in worlds.values()])[0]) for t in ("color", "shape", "count"))
        arm = ceiling["arm"]
        reached = "—" if arm is None else " / ".join(
            _f(mean_std([per_world[w].get(arm, {}).get(f"vqa_{split}") for w in worlds])[0])
            for split in ("test", "test_ood"))
        rows.append(f"| {label} | {stat(overall['test'])} | {per_type} | {stat(overall['test_ood'])} | "
                    f"{arm or '(baseline: its own prompts)'} | {reached} |")
    return "\n".join(rows)


def video_table_md(video, per_world):
    """Table 7's teacher ceiling (val, test) and alignment levels per world, beside what each arm reached."""
    rows = ["| world | split | teacher ceiling CIDEr / BLEU-4 / ROUGE-L / content | ITG alone CIDEr / content | "
            "ITG + alignment CIDEr / content |", "|---|---|---|---|---|"]
    levels = ["| world | alignment loss reached | one mean prompt for every video | lowest reachable (each video's "
              "mean prompt) |", "|---|---|---|---|"]
    for world, found in video.items():
        if not found:
            continue
        arms = per_world.get(world, {})
        for split, c in found["teacher_ceiling"].items():
            reached = [f"{_f(arms.get(a, {}).get(f'cider_{split}'))} / {_f(arms.get(a, {}).get(f'content_{split}'))}"
                       for a in ("video_itg", "video_itg_align")]
            rows.append(f"| {world} | {split} | {_f(c.get('CIDEr'))} / {_f(c.get('Bleu_4'))} / {_f(c.get('ROUGE_L'))}"
                        f" / {_f(c.get('content_accuracy'))} | {reached[0]} | {reached[1]} |")
        lv = found["alignment_levels"] or {}
        levels.append(f"| {world} | {_f(lv.get('reached'))} | {_f(lv.get('mean_prompt'))} | "
                      f"{_f(lv.get('video_mean_prompt'))} |")
    return "\n".join(rows) + "\n\n" + "\n".join(levels)


def costs_table(costs):
    rows = ["| table | runs | wall seconds of its runs, one thread each (shared runs counted in each table) | "
            "its own runs only |",
            "|---|---|---|---|"]
    for key, c in costs.items():
        rows.append(f"| {key} | {c['runs']} | {c['seconds']:.0f} | {c['own_seconds']:.0f} |")
    return "\n".join(rows)


def write(out, results, metric_labels, total_seconds=None):
    """results.json (no times: the same runs write the same file) and results.md under ``out``."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "costs"}, f, indent=1, sort_keys=True, default=str)
    worlds = results["worlds"]
    lines = [f"# The paper in miniature: world seeds {', '.join(map(str, worlds))}, scale `{results['scale']}`", "",
             "Each number is the mean ± standard deviation over the worlds, each world's value in brackets "
             "(world seed order). VQA: zero-shot accuracy over colour, shape and count questions (yes/no apart). "
             "Direction: *agrees* when every world's difference has the paper's sign and their mean exceeds their "
             "standard deviation, *opposite* when every world's difference has the other sign beyond it, "
             "*within the spread* otherwise.", "", "## Directions", "", directions_table(results["tables"]), "",
             "## Teacher ceilings", "",
             "The frozen LLM answering from each teacher's prompt of the true caption (text only, no image), beside "
             "its own text ceiling (the caption's text where the soft prompt goes): what the alignment pulls each "
             "arm's image side toward.", "", ceilings_table(results["ceilings"], results["per_world"]), ""]
    if any(results.get("video", {}).values()):
        lines += ["## Table 7: teacher ceiling and alignment levels", "",
                  "The captions the frozen video LM writes from the stage-0 P-Former's prompt of each video's first "
                  "true caption (text only, no video), and where the aligned arm's alignment-only stage ended "
                  "(alignment loss, w x MSE) against a connector that ignores the video and the lowest level any "
                  "function of the video can reach (video_table.alignment_levels).", "",
                  video_table_md(results["video"], results["per_world"]), ""]
    for key, table in results["tables"].items():
        lines += [f"## {table['title']}", "", f"Paper: {table['paper']}.", ""]
        if table["note"]:
            lines += [table["note"], ""]
        lines += [table_markdown(key, table, metric_labels[key]), ""]
    if results.get("costs"):
        lines += ["## Cost", "", costs_table(results["costs"]), ""]
    if total_seconds is not None:
        lines += [f"Wall time: {total_seconds / 60:.1f} min (timings.json).", ""]
    if results.get("failed"):
        lines += ["## Failed runs", ""] + [f"- {name}" for name in results["failed"]] + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)
