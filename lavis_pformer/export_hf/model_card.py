"""The exported model's provenance (stages, alignment weights, checkpoints, P-Former, datasets) and its model card."""
import json
import logging
import os

import torch
from omegaconf import OmegaConf

from lavis_pformer.export_hf.weights_files import sha256_of

NOT_FOUND = "file not found at export time (paths are relative to the training working directory)"


def _plain(cfg):
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def read_run_config(path):
    """The run config a LAVIS checkpoint carries (``checkpoint["config"]``), or None; reads no tensor data."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (a missing or foreign file is reported, not fatal)
        logging.warning("cannot read %s for its run config (%s)", path, e)
        return None
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else None


def stage_name(config):
    model = config.get("model") or {}
    arch, task = str(model.get("arch", "")), str((config.get("run") or {}).get("task", ""))
    if arch.startswith("pformer_"):
        return "stage 0 (P-Former)"
    if arch.startswith("blip2_qformer"):
        return "stage 1 (Q-Former: ITC + ITM + ITG + w1 x alignment)"
    if "caption" in task:
        return "caption fine-tuning"
    return "stage 2 (LM + w2 x alignment)"


def dataset_summary(config):
    out = []
    for name, dataset in (config.get("datasets") or {}).items():
        info = (dataset or {}).get("build_info") or {}
        storage = {}
        for kind in ("annotations", "images", "features", "storage"):
            value = info.get(kind)
            if isinstance(value, dict):
                if "storage" in value:
                    storage[kind] = value["storage"]
                else:
                    storage.update({f"{kind}.{split}": (v or {}).get("storage") if isinstance(v, dict) else v
                                    for split, v in value.items()})
            elif value is not None:
                storage[kind] = value
        out.append({"name": name, "storage": storage or "LAVIS default build_info"})
    return out


def dataset_text(dataset):
    storage = dataset["storage"]
    if isinstance(storage, dict):
        storage = ", ".join(f"{k}: `{v}`" for k, v in storage.items())
    return f"{dataset['name']} ({storage})"


def pformer_info(path):
    info = {"path": path}
    if not path:
        return None
    if not os.path.isfile(path):
        info["note"] = NOT_FOUND
        logging.warning("P-Former checkpoint %s not found: the model card will lack its sha256", path)
        return info
    info["sha256"] = sha256_of(path)
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta") or {}
        info.update({k: meta[k] for k in ("llm_name", "llm_hidden_size", "num_query_token", "bert_model") if k in meta})
    except Exception as e:  # noqa: BLE001
        info["note"] = f"not readable as a P-Former checkpoint ({type(e).__name__})"
    return info


def collect_provenance(checkpoint, run_cfg):
    """Stages from the exported checkpoint back through ``model.pretrained``, each with w, data and P-Former."""
    from lavis.common.registry import registry

    stages, seen = [], set()
    path, config, source = checkpoint, read_run_config(checkpoint), "checkpoint"
    if config is None:
        config, source = _plain(run_cfg), "--cfg-path (the checkpoint carries no run config)"
    while config is not None and len(stages) < 6:
        model = config.get("model") or {}
        cls = registry.get_model_class(model.get("arch", ""))
        weight = model.get("alignment_weight", getattr(cls, "DEFAULT_ALIGNMENT_WEIGHT", None))
        entry = {
            "stage": stage_name(config), "checkpoint": path, "config_source": source, "arch": model.get("arch"),
            "alignment_weight": weight, "pformer": pformer_info(model.get("pformer_checkpoint") or None)
            if weight else None, "datasets": dataset_summary(config),
        }
        if path and os.path.isfile(path):
            entry["sha256"] = sha256_of(path)
        stages.append(entry)
        previous = model.get("pretrained") if model.get("load_pretrained", True) else None
        if not previous or previous in seen or str(previous).startswith(("http://", "https://")):
            if previous:
                stages.append({"stage": "earlier", "checkpoint": previous, "note": "not followed"})
            break
        seen.add(previous)
        if not os.path.isfile(previous):
            stages.append({"stage": "earlier", "checkpoint": previous, "note": NOT_FOUND})
            break
        path, config, source = previous, read_run_config(previous), "checkpoint"
        if config is None:
            stages.append({"stage": "earlier", "checkpoint": previous, "note": "carries no run config"})
            break
    return stages


def model_card(summary):
    """README.md for the export folder."""
    prov, lines = summary["provenance"], []
    decoder_only = summary["decoder_only"]
    lines += [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [blip-2, p-former, lavis]",
        "---",
        "",
        f"# BLIP-2 ({summary['arch']}, {summary['llm']}) trained with P-Former",
        "",
        "A BLIP-2 model trained in LAVIS with the P-Former recipe (*Bootstrapping Vision-Language Learning with",
        "Decoupled Language Pre-training*, NeurIPS 2023) by lavis-pformer, exported to transformers'",
        "`Blip2ForConditionalGeneration` by `python -m lavis_pformer.export_hf`. At inference it is a plain BLIP-2:",
        "the P-Former was a training-time teacher only and is not part of this folder.",
        "",
        "## Use",
        "",
        "Tested with transformers 5.25.0 (`FOLDER`: this folder's path, or its Hub id):",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "",
        "processor = Blip2Processor.from_pretrained(FOLDER)  # backend=\"pil\": LAVIS's exact resize",
        "model = Blip2ForConditionalGeneration.from_pretrained(FOLDER).eval()",
        f"inputs = processor(images=Image.open(\"photo.jpg\").convert(\"RGB\"), text={json.dumps(summary['prompt'])}, "
        "return_tensors=\"pt\")",
        "ids = model.generate(**inputs, generation_config=model.generation_config)  # this folder's defaults",
        "print(processor.batch_decode(ids[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        if decoder_only else "print(processor.batch_decode(ids, skip_special_tokens=True))",
        "```",
        "",
        f"- Image: {summary['image_size']} px, bicubic resize, CLIP normalisation (the LAVIS eval processor, from "
        f"{summary['image_processor_source']}).",
        f"- Prompt: the model's caption prompt is {json.dumps(summary['prompt'])}; for zero-shot VQA LAVIS passes "
        "`\"Question: {} Short answer:\".format(question)` as the text.",
        f"- Generation stops at {summary['eos_note']}; `generation_config.json` sets max_new_tokens="
        f"{summary['max_new_tokens']} and greedy decoding.",
        "",
        "## Training provenance",
        "",
        "| stage | checkpoint | w (alignment weight) | P-Former checkpoint (sha256) | data |",
        "|---|---|---|---|---|",
    ]
    for entry in prov:
        pformer = entry.get("pformer") or {}
        pf = "none (alignment_weight 0: BLIP-2 baseline)" if entry.get("alignment_weight") == 0 else (
            f"`{pformer.get('path')}` ({pformer.get('sha256') or pformer.get('note', 'unknown')})" if pformer else "-")
        data = "; ".join(dataset_text(d) for d in entry.get("datasets", [])) or "-"
        ckpt = f"`{entry.get('checkpoint')}`" + (f" (sha256 {entry['sha256']})" if entry.get("sha256") else "")
        if entry.get("note"):
            ckpt += f" — {entry['note']}"
        weight = entry.get("alignment_weight", "-")
        lines.append(f"| {entry['stage']} | {ckpt} | {weight if weight is not None else '-'} | {pf} | {data} |")
    pformers = [e["pformer"] for e in prov if e.get("pformer") and e["pformer"].get("llm_name")]
    if pformers:
        p = pformers[0]
        lines += ["", f"P-Former (stage 0) trained for LLM `{p.get('llm_name')}` (width {p.get('llm_hidden_size')}, "
                      f"{p.get('num_query_token')} queries, BERT `{p.get('bert_model')}`)."]
    lines += [
        "",
        "## Export",
        "",
        f"- Backbones: ViT `{summary['vit_model']}`, Q-Former from `{summary['bert_model']}`, LLM `{summary['llm']}` "
        "(frozen, weights as LAVIS held them).",
        f"- Weights: {summary['dtype']} (Q-Former and query tokens float32, as transformers keeps them).",
        f"- `<image>` token id {summary['image_token_id']}: `Blip2Processor` puts {summary['num_query_tokens']} of them "
        "before the text; the model replaces them with the projected query outputs (LAVIS's sequence).",
    ]
    if summary["added_vocab_rows"]:
        lines.append(f"- The LLM's vocabulary had no free row for `<image>`: {summary['added_vocab_rows']} zero row(s) "
                     "added, which `generation_config.json` suppresses (`suppress_tokens`; pass "
                     "`generation_config=model.generation_config` as above).")
    lines += [f"- {note}" for note in summary["notes"]]
    lines += [f"- Exported {summary['date']} with lavis-pformer {summary['lavis_pformer_version']}, "
              f"LAVIS {summary['lavis_version']}, torch {summary['torch_version']}.", ""]
    return "\n".join(lines)
