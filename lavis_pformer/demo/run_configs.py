"""The ``train.py`` / ``evaluate.py`` configs of the demo's runs: stage 0, 1, 2, zero-shot VQA and captioning, on the
shapes world and the frozen backbones of a pipeline context (``pipeline.prepare``).

``llm`` chooses the frozen LM of stages 0 and 2 and of the evaluations: "opt" (the demo's) or "t5" (the
encoder-decoder LM of the backbones' ``t5/``). Stage 1 has no LM; its teacher may be either P-Former.
"""
import json
import os

from lavis_pformer.text import QA_PROMPT

# Per frozen LM: the stage-0 and stage-2 archs, the model key of its folder and the context key holding that folder.
LLMS = {
    "opt": {"stage0": "pformer_opt", "stage2": "blip2_opt_pformer", "key": "opt_model", "ctx": "lm"},
    "t5": {"stage0": "pformer_t5", "stage2": "blip2_t5_pformer", "key": "t5_model", "ctx": "t5"},
}


def repeated_pairs(world, data_dir, repeat):
    """``captions_train.json`` with its pairs repeated ``repeat`` times (longer epochs, fewer checkpoints)."""
    if repeat == 1:
        return os.path.join(world, "captions_train.json")
    path = os.path.join(data_dir, f"captions_train_x{repeat}.json")
    with open(os.path.join(world, "captions_train.json"), encoding="utf-8") as f:
        pairs = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(pairs * repeat, f)
    return path


def subset(src, dst, n):
    """The first ``n`` lines of ``src`` into ``dst`` (the stage-0 budget: steps = n / batch)."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return dst


def _run_cfg(ctx, output_dir, task, **extra):
    run = {
        "task": task, "runner": "runner_pformer", "num_workers": 0, "seed": ctx["seed"], "output_dir": output_dir,
        "amp": False, "device": ctx["scale"]["device"], "world_size": 1, "dist_url": "env://", "distributed": True,
    }
    run.update(extra)
    return run


def _train_sched(stage, log_freq=10):
    return dict(lr_sched="linear_warmup_cosine_lr", init_lr=stage["lr"], min_lr=stage["lr"] / 10, warmup_lr=1e-5,
                warmup_steps=10, weight_decay=0.05, max_epoch=stage["epochs"], batch_size_train=stage["batch"],
                batch_size_eval=stage["batch"], accum_grad_iters=1, log_freq=log_freq, evaluate=False,
                train_splits=["train"])


def _llm(ctx, llm):
    """{<llm key>: the frozen LLM's folder, "llm_precision": "fp32"}."""
    if llm not in LLMS:
        raise ValueError(f"llm must be one of {sorted(LLMS)}, got {llm!r}")
    return {LLMS[llm]["key"]: ctx[LLMS[llm]["ctx"]], "llm_precision": "fp32"}


def _vision(ctx):
    """Model keys every image stage shares: the frozen ViT, the starting BERT and the Q-Former's shape (stage 1
    has no LLM; stage 2 and the evaluations add ``_llm``)."""
    vit = dict(ctx["recipe"]["vit"]["config"], checkpoint=ctx["vit"])
    return dict(vit_model="custom_vit", vit_config=vit, image_size=32, vit_precision="fp32", freeze_vit=True,
                bert_model=ctx["bert"], num_query_token=ctx["scale"]["num_query_token"], cross_attention_freq=1)


def _caption_data(ctx, splits=("train",), storage=None):
    world = ctx["world"]
    annotations = {}
    for split in splits:
        ann = annotations[split] = {"storage": storage or os.path.join(world, f"captions_{split}.json")}
        if split != "train":
            ann["gt"] = os.path.join(world, f"coco_gt_{split}.json")
    return {"local_caption": {
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32},
                          "eval": {"name": "blip_image_eval", "image_size": 32}},
        "build_info": {"images": {"storage": world}, "annotations": annotations}}}


def run_dir(ctx, name):
    """Where run ``name`` writes (``<runs>/<name>/latest`` is its newest job folder)."""
    return os.path.join(ctx["runs"], name, "latest")


def stage0_data(ctx, qa):
    """The demo's stage-0 text: the first ``stage0.lines`` lines of the world's sentences (or, for the QA term,
    of its (caption, question, answer) triples)."""
    lines = ctx["scale"]["stage0"]["lines"]
    src = "qa_triples.jsonl" if qa else "sentences.txt"
    return subset(os.path.join(ctx["world"], src),
                  os.path.join(ctx["data"], f"stage0_{'qa' if qa else 'sent'}_{lines}" + (".jsonl" if qa else ".txt")),
                  lines)


def stage0_cfg(ctx, name, data, qa=False, llm="opt"):
    """Stage 0 on the text file ``data`` (sentences, or QA triples with ``qa``) against the frozen ``llm``."""
    s0 = ctx["scale"]["stage0"]
    noise = dict(mask_prob=0.25, vq_weight=1.0) if llm == "opt" else dict(mask_prob=0.0, vq_weight=0.0)
    model = {"arch": LLMS[llm]["stage0"], "model_type": "tiny", "bert_model": ctx["bert"], **_llm(ctx, llm),
             "num_query_token": ctx["scale"]["num_query_token"], "max_txt_len": 32, "embed_dim": 64,
             "lm_weight": 1.0, "contrastive_weight": 1.0, "label_smoothing": 0.1,
             "qa_weight": s0["qa_weight"] if qa else 0.0, **noise}
    return {"model": model,
            "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": data}}}}},
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "pformer_pretrain", **_train_sched(s0))}


def stage1_cfg(ctx, name, w1, stage0):
    s1 = ctx["scale"]["stage1"]
    model = dict(arch="blip2_qformer_pformer", model_type="tiny", embed_dim=64, max_txt_len=32, alignment_weight=w1,
                 pformer_checkpoint=os.path.join(run_dir(ctx, stage0), "pformer.pth") if w1 else "", **_vision(ctx))
    pairs = repeated_pairs(ctx["world"], ctx["data"], s1["repeat"])
    return {"model": model, "datasets": _caption_data(ctx, storage=pairs),
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "image_text_pretrain_pformer", **_train_sched(s1))}


def stage2_cfg(ctx, name, w2, stage0, stage1, llm="opt", pretrained=None, stage=None):
    """Stage 2 (LM loss + ``w2`` x alignment to ``stage0``'s teacher) from ``stage1``'s last checkpoint; with
    ``pretrained`` (a checkpoint path) and ``stage`` (budget) instead, e.g. caption fine-tuning."""
    s2 = stage or ctx["scale"]["stage2"]
    model = dict(arch=LLMS[llm]["stage2"], model_type="tiny", max_txt_len=32, alignment_weight=w2, prompt="",
                 pretrained=pretrained or os.path.join(run_dir(ctx, stage1), "checkpoint_last.pth"),
                 pformer_checkpoint=os.path.join(run_dir(ctx, stage0), "pformer.pth") if w2 else "",
                 **_vision(ctx), **_llm(ctx, llm))
    pairs = repeated_pairs(ctx["world"], ctx["data"], s2["repeat"])
    return {"model": model, "datasets": _caption_data(ctx, storage=pairs),
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "image_text_pretrain_pformer", **_train_sched(s2))}


def _eval_model(ctx, trained, llm="opt"):
    return dict(arch=LLMS[llm]["stage2"], model_type="tiny", load_finetuned=True,
                finetuned=os.path.join(run_dir(ctx, trained), "checkpoint_last.pth"), **_vision(ctx),
                **_llm(ctx, llm))


def vqa_cfg(ctx, name, stage2, splits=("val", "test"), llm="opt"):
    world, ev = ctx["world"], ctx["scale"]["eval"]
    ann = {s: {"storage": os.path.join(world, f"vqa_{s}.json"),
               "question_file": os.path.join(world, f"vqa_{s}_questions.json"),
               "annotation_file": os.path.join(world, f"vqa_{s}_annotations.json")} for s in splits}
    run = _run_cfg(ctx, os.path.join(ctx["runs"], name), "vqa", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], max_len=ev["vqa_max_len"], min_len=1, num_beams=ev["num_beams"],
                   inference_method="generate", prompt=QA_PROMPT, evaluate=True, test_splits=list(splits))
    return {"model": _eval_model(ctx, stage2, llm),
            "datasets": {"local_vqa": {"build_info": {"images": {"storage": world}, "annotations": ann}}},
            "run": run}


def caption_cfg(ctx, name, trained, splits=("val", "test"), llm="opt"):
    ev = ctx["scale"]["eval"]
    run = _run_cfg(ctx, os.path.join(ctx["runs"], name), "captioning_pformer", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], max_len=ev["cap_max_len"], min_len=1, num_beams=ev["num_beams"],
                   caption_spice=False, evaluate=True, test_splits=list(splits))
    return {"model": _eval_model(ctx, trained, llm), "datasets": _caption_data(ctx, splits), "run": run}
