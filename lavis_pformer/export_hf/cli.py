"""``python -m lavis_pformer.export_hf``: :func:`export` writes the transformers folder (docs/export.md)."""
import argparse
import datetime
import logging
import os
import shutil
import sys
import tempfile

import torch

from lavis_pformer.export_hf import ExportError
from lavis_pformer.export_hf.lavis_model import build_lavis_model
from lavis_pformer.export_hf.mapping import language_part, llm_of, qformer_part, vision_part
from lavis_pformer.export_hf.model_card import collect_provenance, model_card
from lavis_pformer.export_hf.processors import image_processor_config, save_tokenizer
from lavis_pformer.export_hf.weights_files import parse_size, write_json, write_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# LAVIS's caption generation default (Blip2OPT / Blip2T5 ``generate(max_length=30)``: new tokens).
DEFAULT_MAX_NEW_TOKENS = 30


def export(cfg_path, checkpoint, out_dir, options=(), dtype="fp32", max_shard_size="5GB", overwrite=False):
    """Write the transformers folder; returns a summary dict (also in ``export_provenance.json``)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    max_shard_bytes = parse_size(max_shard_size)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty; choose another folder or pass --overwrite")

    model, model_cfg, run_cfg, preprocess = build_lavis_model(cfg_path, checkpoint, options)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_hf-", dir=parent)
    try:
        summary = write_folder(tmp, model, model_cfg, run_cfg, preprocess, checkpoint, DTYPES[dtype], max_shard_bytes)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def write_folder(folder, model, model_cfg, run_cfg, preprocess, checkpoint, target, max_shard_bytes):
    """Write every file of the export into ``folder``; returns the summary."""
    llm, tokenizer, _, decoder_only = llm_of(model)
    with torch.no_grad():
        image_token_id, tokenizer_len = save_tokenizer(tokenizer, folder, decoder_only)
        vision_config, vision_tensors, notes = vision_part(model, model_cfg.get("vit_model"))
        qformer_config, qformer_tensors = qformer_part(model, vision_config["hidden_size"])
        text_config, text_tensors, added = language_part(model, image_token_id)
    for note in notes:
        logging.warning("%s", note)
    num_query_tokens = int(model.query_tokens.shape[1])
    tensors = cast_tensors({**vision_tensors, **qformer_tensors, **text_tensors}, target)
    files = write_weights(folder, tensors, max_shard_bytes)

    image_size = vision_config["image_size"]
    processor_cfg, processor_source = image_processor_config(run_cfg, preprocess, image_size)
    write_json(os.path.join(folder, "preprocessor_config.json"), processor_cfg)
    write_json(os.path.join(folder, "processor_config.json"),
               {"processor_class": "Blip2Processor", "num_query_tokens": num_query_tokens})
    generation, eos_note = generation_config(llm, tokenizer, decoder_only, run_cfg, text_config, added)
    write_json(os.path.join(folder, "generation_config.json"), generation)
    write_json(os.path.join(folder, "config.json"), {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "num_query_tokens": num_query_tokens,
        "image_token_index": image_token_id,
        "use_decoder_only_language_model": decoder_only,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "dtype": DTYPE_NAMES[target],
        "vision_config": vision_config,
        "qformer_config": qformer_config,
        "text_config": text_config,
    })

    summary = {
        "arch": model_cfg.get("arch"),
        "llm": model_cfg.get("opt_model") if decoder_only else model_cfg.get("t5_model"),
        "vit_model": model_cfg.get("vit_model"),
        "bert_model": model_cfg.get("bert_model", "bert-base-uncased"),
        "decoder_only": decoder_only,
        "prompt": model.prompt or "",
        "image_size": image_size,
        "image_processor_source": processor_source,
        "num_query_tokens": num_query_tokens,
        "image_token_id": image_token_id,
        "tokenizer_size": tokenizer_len,
        "added_vocab_rows": added,
        "dtype": DTYPE_NAMES[target],
        "max_new_tokens": generation["max_new_tokens"],
        "eos_note": eos_note,
        "notes": notes,
        "weight_files": files,
        "num_tensors": len(tensors),
        "provenance": collect_provenance(checkpoint, run_cfg),
        **versions(),
    }
    write_json(os.path.join(folder, "export_provenance.json"), summary)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(summary))
    return summary


def cast_tensors(tensors, target):
    """Floating-point tensors in ``target``, except the Q-Former and the query tokens (fp32, as transformers keeps
    them)."""
    cast = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        keep_fp32 = name == "query_tokens" or name.startswith("qformer.")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if keep_fp32 else target)
        cast[name] = tensor
    return cast


def generation_config(llm, tokenizer, decoder_only, run_cfg, text_config, added):
    """(generation_config.json, the end-of-text note of the card): LAVIS's end of text, the run's ``max_len``,
    greedy; the end of text is also set in ``text_config``."""
    max_new_tokens = int((run_cfg.get("run") or {}).get("max_len", DEFAULT_MAX_NEW_TOKENS))
    generation = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False,
                  "pad_token_id": llm.config.pad_token_id}
    if decoder_only:
        # LAVIS's Blip2OPT ends generation at "\n" (the token it appends to every training caption). The
        # language model's own generation defaults come from text_config, so eos is set there too.
        newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
        generation.update(bos_token_id=llm.config.bos_token_id, eos_token_id=newline)
        text_config["eos_token_id"] = newline
        eos_note = f'"\\n" (token {newline}), as LAVIS\'s Blip2OPT'
    else:
        generation.update(eos_token_id=llm.config.eos_token_id,
                          decoder_start_token_id=llm.config.decoder_start_token_id)
        eos_note = f"the T5 end-of-sequence token ({llm.config.eos_token_id}), as LAVIS's Blip2T5"
    if added:
        generation["suppress_tokens"] = list(range(text_config["vocab_size"] - added, text_config["vocab_size"]))
    return generation, eos_note


def versions():
    import lavis

    import lavis_pformer

    return {
        "date": datetime.date.today().isoformat(),
        "lavis_pformer_version": lavis_pformer.__version__,
        "lavis_version": getattr(lavis, "__version__", "1.0.2"),
        "torch_version": torch.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_pformer.export_hf",
        description="Export a trained BLIP-2 (OPT / Flan-T5) to a transformers Blip2ForConditionalGeneration folder.",
    )
    parser.add_argument("--cfg-path", required=True,
                        help="the stage-2 or caption fine-tuning config the model was trained with")
    parser.add_argument("--checkpoint", required=True,
                        help="the run's checkpoint (checkpoint_N.pth / checkpoint_best.pth)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="weights dtype (default fp32; Q-Former and query tokens stay fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--options", nargs="+", default=[],
                        help="override settings of the config, as key=value (e.g. model.llm_precision=fp32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = export(args.cfg_path, args.checkpoint, args.out, args.options, args.dtype, args.max_shard_size,
                         args.overwrite)
    except (ExportError, ValueError, FileNotFoundError) as e:  # user errors (config, checkpoint, paths)
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary['num_tensors']} tensors in {', '.join(summary['weight_files'])}, "
          f"image token {summary['image_token_id']}, {summary['num_query_tokens']} query tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
