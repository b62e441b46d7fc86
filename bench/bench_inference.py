"""Inference cost of a trained ``blip2_opt_pformer``: the plugin model loaded for evaluation vs LAVIS's Blip2OPT.

A ``blip2_opt_pformer`` is built for training (with its P-Former teacher); its checkpoint is written as
LAVIS's runner writes one (the trainable tensors; the frozen ViT and OPT are not saved, the teacher never
is). Then, side by side in one process:

- the plugin model built with ``for_training=False`` from that checkpoint (``load_finetuned``), as an
  evaluation run builds it;
- LAVIS's own ``Blip2OPT`` (hard-coded backbones redirected, as the tests do) loaded from the same file
  with LAVIS's ``load_from_pretrained``. Both use the same frozen ViT and OPT (one object each; in a real
  run both would load the same eva_clip_g / OPT files).

Timed: ``generate`` (captioning; the plugin inherits LAVIS's) and zero-shot VQA. LAVIS 1.0.2's Blip2OPT
has no ``predict_answers``, so the stock reference for the plugin's ``predict_answers`` (prompt
"Question: {} Short answer:", beam 5, 10 new tokens, length penalty -1) is LAVIS's ``generate`` with the
formatted question as ``samples["prompt"]``: one question for the whole batch, so that both runs are the
same computation (no padding); the answers are compared. Goal: 1.00x. The script also reports how many
P-Former parameters each model holds and how many P-Former modules exist in the process (expected: 0),
and exits with an error when there is any.

    python bench/bench_inference.py                 # tiny, CPU
    python bench/bench_inference.py --device cuda   # paper sizes
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

from lavis_pformer.text import QA_PROMPT  # noqa: E402

SCRIPT = "bench_inference"
QUESTION = "what color is the circle?"


def pformer_params(model):
    from lavis_pformer.pformer import PFormer

    return sum(M.param_count(m) for m in model.modules() if isinstance(m, PFormer))


def pformer_instances():
    """P-Former modules alive anywhere in the process."""
    from lavis_pformer.pformer import PFormer

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, PFormer))


def runner_checkpoint(model, path):
    """What LAVIS's runner saves: state_dict() without the frozen parameters."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if k not in frozen}
    torch.save({"model": state, "epoch": 0}, path)
    return sorted(state)


def build_models(sizes, teacher, work):
    from lavis.models.blip2_models.blip2_opt import Blip2OPT

    torch.manual_seed(0)
    trained = MF.build_registered("blip2_opt_pformer", MF.model_cfg(sizes, alignment_weight=100,
                                                                  pformer_checkpoint=teacher), for_training=True)
    assert trained.pformer_teacher is not None
    with torch.no_grad():  # move away from the initialisation, as training would
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    path = os.path.join(work, "checkpoint_best.pth")
    keys = runner_checkpoint(trained, path)
    teacher_keys = [k for k in keys if k.startswith("pformer_teacher.")]
    del trained
    instances_after_training_model = pformer_instances()

    ours = MF.build_registered("blip2_opt_pformer", MF.model_cfg(sizes, load_finetuned=True, finetuned=path),
                              for_training=False)
    torch.manual_seed(1)
    stock = MF.stock_model(Blip2OPT, sizes, visual_encoder=ours.visual_encoder, opt_model=sizes["opt"])
    Blip2OPT.load_from_pretrained(stock, path)  # LAVIS's loader (strict=False)
    stock.opt_model = ours.opt_model  # one frozen OPT (already the same object at paper sizes)
    if not sizes["llm_precision"] == "fp16":
        stock.float()  # as lavis.models.load_model does on CPU
    ours_params = dict(ours.named_parameters())
    for name, p in stock.named_parameters():
        if p is not ours_params[name]:
            assert torch.equal(p.detach().cpu().float(), ours_params[name].detach().cpu().float()), name
    assert set(ours_params) == {n for n, _ in stock.named_parameters()}, "parameter sets differ"
    return ours, stock, dict(checkpoint_tensors=len(keys), checkpoint_teacher_tensors=len(teacher_keys),
                             pformer_instances_after_deleting_training_model=instances_after_training_model)


def timed_calls(ours, stock, image, args):
    """{name: call} of generate and VQA for both models, and the dict where each call leaves its output."""
    gen_kwargs = dict(num_beams=args.num_beams, max_length=args.caption_max_len, min_length=1)
    vqa_prompt = QA_PROMPT.format(QUESTION)
    outputs = {}

    def run(key, fn):
        def call():
            outputs[key] = fn()
        return call

    fns = {
        "ours_generate": run("ours_generate", lambda: ours.generate({"image": image}, **gen_kwargs)),
        "stock_generate": run("stock_generate", lambda: stock.generate({"image": image}, **gen_kwargs)),
        "ours_vqa": run("ours_vqa", lambda: ours.predict_answers(
            {"image": image, "text_input": [QUESTION] * args.batch}, num_beams=args.num_beams,
            max_len=args.vqa_max_len, min_len=1, prompt=QA_PROMPT, length_penalty=-1)),
        "stock_vqa": run("stock_vqa", lambda: stock.generate(
            {"image": image, "prompt": vqa_prompt}, num_beams=args.num_beams, max_length=args.vqa_max_len,
            min_length=1, length_penalty=-1)),
    }
    return fns, outputs


def tabulate(times, peaks, outputs, models, presence):
    """Results per task (generate, VQA) and the table."""
    same = {"generate": outputs["ours_generate"] == outputs["stock_generate"],
            "vqa": outputs["ours_vqa"] == outputs["stock_vqa"]}
    rows, results = [], {}
    for task, label in (("generate", "generate (caption)"), ("vqa", "VQA: predict_answers / stock generate")):
        r = M.ratio_summary(times[f"ours_{task}"], times[f"stock_{task}"])
        results[task] = dict(ours=M.summarize(times[f"ours_{task}"]), stock=M.summarize(times[f"stock_{task}"]),
                             ours_peak_bytes=peaks[f"ours_{task}"], stock_peak_bytes=peaks[f"stock_{task}"],
                             time_ratio=r, peak_ratio=peaks[f"ours_{task}"] / peaks[f"stock_{task}"],
                             same_outputs=same[task], example_output=outputs[f"ours_{task}"][0])
        for key, name in (("ours", "blip2_opt_pformer (for_training=False)"), ("stock", "LAVIS Blip2OPT")):
            s = results[task][key]
            rows.append([label, name, R.fmt_s(s["median"]), R.fmt_spread(s),
                         f"**{r['ratio']:.3f}x**" if key == "ours" else "1",
                         f"{r['paired_min']:.3f}–{r['paired_max']:.3f}" if key == "ours" else "",
                         f"{r['min_ratio']:.3f}x" if key == "ours" else "",
                         R.fmt_mb(peaks[f"{key}_{task}"]), f"{models[key]['params']:,}",
                         presence[f"{key}_pformer_params"], ("yes" if same[task] else "NO") if key == "ours" else ""])
    headers = ["call", "model", "ms (median)", "IQR (min–max) ms", "time ratio", "paired ratio min–max",
               "ratio of minima",
               "peak MB above start", "parameters", "P-Former parameters", "same outputs"]
    return results, R.markdown_table(headers, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, batch_tiny=8, batch_paper=32, warmup=1)
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--caption-max-len", type=int, default=30, help="max new tokens of generate")
    parser.add_argument("--vqa-max-len", type=int, default=10, help="max new tokens of the VQA answer")
    args = C.finish_args(parser.parse_args(argv))
    if args.amp:
        print("note: --amp does not apply to inference (the models autocast on CUDA themselves)")
    C.quiet()
    machine = R.machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as work:
        sizes = BS.resolve_sizes(args, work)
        teacher = MF.make_teacher(sizes, work)
        with BS.random_init_backbones(args.device if args.size == "paper" else "cpu"):
            ours, stock, ckpt_info = build_models(sizes, teacher, work)
    ours.to(args.device).eval()
    stock.to(args.device).eval()
    image = MF.images(args.batch, sizes["image_size"], args.device)
    fns, outputs = timed_calls(ours, stock, image, args)
    times = M.time_interleaved(fns, args.repeats, args.warmup, args.device)
    peaks = {k: M.peak_memory(f, args.device) for k, f in fns.items()}
    presence = dict(
        ours_pformer_params=pformer_params(ours), stock_pformer_params=pformer_params(stock),
        ours_has_teacher=getattr(ours, "pformer_teacher", None) is not None,
        pformer_instances_in_process=pformer_instances(), **ckpt_info)
    models = {key: dict(params=M.param_count(m), model_bytes=M.module_bytes(m)) for key, m in
              (("ours", ours), ("stock", stock))}
    results, md = tabulate(times, peaks, outputs, models, presence)
    sizes_line = (f"{args.size}, {sizes['bert_desc']}, {sizes['opt_desc']}, {sizes['vit_desc']}, "
                  f"Q={sizes['num_query_token']}, batch {args.batch}, beams {args.num_beams}, {args.device}")
    vqa_prompt = QA_PROMPT.format(QUESTION)
    prompt_tokens = len(stock.opt_tokenizer(vqa_prompt).input_ids)
    ok = (presence["ours_pformer_params"] == 0 and not presence["ours_has_teacher"]
          and presence["pformer_instances_in_process"] == 0 and presence["checkpoint_teacher_tensors"] == 0)
    notes = [
        f"P-Former in memory during inference: {presence['pformer_instances_in_process']} modules in the process, "
        f"{presence['ours_pformer_params']} parameters in the plugin model, teacher: {presence['ours_has_teacher']}; "
        f"the checkpoint holds {presence['checkpoint_tensors']} tensors, {presence['checkpoint_teacher_tensors']} "
        f"of the teacher -> {'OK' if ok else 'FAIL'}.",
        "VQA reference: LAVIS 1.0.2's Blip2OPT has no predict_answers; its generate() with the formatted question as "
        "samples['prompt'] (same question for the batch) is the same computation.",
        f"memory: {M.MEMORY_METHOD[C.device_tag(args.device)]}; model weights are not included (params column).",
    ]
    if prompt_tokens > sizes["max_txt_len"]:
        notes.append(f"the VQA prompt has {prompt_tokens} OPT tokens > max_txt_len {sizes['max_txt_len']}: "
                     "predict_answers truncates it and LAVIS's generate does not, so the two VQA rows differ in "
                     "work and answers; raise --max-txt-len for a like-for-like comparison.")
    payload = dict(machine=machine, sizes=sizes, sizes_line=sizes_line, args=R.args_record(args), argv=argv,
                   results=results, models=models, pformer_presence=presence, pformer_free=ok,
                   vqa_prompt=vqa_prompt, vqa_prompt_tokens=prompt_tokens,
                   times_s=times, peak_bytes=peaks)
    R.publish(SCRIPT, args, machine, sizes_line, md, notes, payload)
    if not ok:
        raise SystemExit("FAIL: a P-Former is in memory or in the checkpoint of the inference model")
    return payload


if __name__ == "__main__":
    main()
