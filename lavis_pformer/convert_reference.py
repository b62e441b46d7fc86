"""Convert the authors' reference P-Former weights into a `PFormer.save` checkpoint.

    python -m lavis_pformer.convert_reference --src ref.pth --out pformer.pth --llm-name facebook/opt-2.7b \
        --num-query-token 32 --bert-model bert-base-uncased [--bert-config path/config.json]

Reference layout: a state dict (possibly under "model") with the P-Former under `Pformer.` (or
`Darkformer.`): BERT weights (with or without a `bert.` infix), `cls_proj`, `pooler.0`, `text_proj`, `temp`
and `opt_proj` or `t5_proj`. Other keys are ignored; BERT pooler and MLM head are dropped.
"""
import argparse
import logging

import torch
import transformers

from lavis_pformer.pformer import PFormer, PFormerCheckpointError, state_dict_problems

logger = logging.getLogger(__name__)

PREFIXES = ("Pformer.", "Darkformer.")
HEAD_NAMES = {"cls_proj.": "query_proj.", "pooler.0.": "prompt_head.0.", "text_proj.": "text_proj.",
              "opt_proj.": "llm_proj.", "t5_proj.": "llm_proj."}
BERT_PARTS = ("embeddings.", "encoder.")
DROPPED = ("pooler.dense.", "bert.pooler.", "cls.")  # BERT pooler, MLM head
POSITION_IDS = "encoder.embeddings.position_ids"


class ReferenceConversionError(ValueError):
    """The reference state dict cannot be mapped onto a PFormer."""


def _target_name(rest: str):
    """Reference name without prefix -> PFormer name, "" for dropped keys, None if unplaceable."""
    if rest.startswith(DROPPED):
        return ""
    if rest == "temp":
        return "temp"
    for old, new in HEAD_NAMES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    bert = rest[len("bert."):] if rest.startswith("bert.") else rest
    if bert.startswith(BERT_PARTS):
        return "encoder." + bert
    return None


def convert_reference_state_dict(state_dict: dict, bert_config: transformers.BertConfig, num_query_token: int,
                                 llm_name: str, bert_model: str) -> PFormer:
    """Reference P-Former state dict (under "Pformer." / "Darkformer.") -> PFormer holding exactly those weights."""
    prefixes = sorted({p for k in state_dict for p in PREFIXES if k.startswith(p)})
    if len(prefixes) != 1:
        sample = ", ".join(list(state_dict)[:8])
        raise ReferenceConversionError(
            f"expected P-Former keys under exactly one of {PREFIXES}, found {prefixes or 'none'} "
            f"(first keys: {sample}); is this the authors' P-Former checkpoint?")
    prefix = prefixes[0]
    outside = [k for k in state_dict if not k.startswith(prefix)]
    mapped, sources, dropped, unplaceable = {}, {}, [], []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        target = _target_name(key[len(prefix):])
        if target is None:
            unplaceable.append(key)
        elif target == "":
            dropped.append(key)
        elif target in mapped:
            unplaceable.append(f"{key} (same target {target!r} as {sources[target]})")
        else:
            mapped[target], sources[target] = tensor, key
    if unplaceable:
        raise ReferenceConversionError(
            f"{len(unplaceable)} key(s) under {prefix!r} cannot be placed in the P-Former: {', '.join(unplaceable)}")
    if "llm_proj.weight" not in mapped:
        raise ReferenceConversionError(
            f"no LLM projection found: expected {prefix}opt_proj.weight or {prefix}t5_proj.weight")
    logger.info("ignored %d key(s) outside %r; dropped %d BERT pooler / MLM head key(s)%s",
                len(outside), prefix, len(dropped), f": {', '.join(dropped)}" if dropped else "")

    llm_hidden_size = mapped["llm_proj.weight"].shape[0]
    embed_dim = mapped["text_proj.weight"].shape[0] if "text_proj.weight" in mapped else 256
    model = PFormer(bert_config, num_query_token, llm_hidden_size, llm_name, embed_dim, bert_model)
    if POSITION_IDS not in mapped:
        logger.info("%s not in the reference weights: keeping arange(max_position_embeddings)", POSITION_IDS)
        mapped[POSITION_IDS] = model.state_dict()[POSITION_IDS]
    problems = state_dict_problems(model.state_dict(), mapped)
    if problems:
        hint = ""
        qp = mapped.get("query_proj.weight")
        if qp is not None and qp.shape[0] != num_query_token * bert_config.hidden_size:
            hint = (f"\n{prefix}cls_proj has {qp.shape[0]} outputs = {qp.shape[0] / bert_config.hidden_size:g} x "
                    f"hidden_size {bert_config.hidden_size}: check --num-query-token ({num_query_token}).")
        raise ReferenceConversionError(
            "reference weights do not fit a PFormer with this BERT config (names are PFormer names; "
            f"{prefix}cls_proj=query_proj, pooler.0=prompt_head.0, opt_proj/t5_proj=llm_proj, bert.*=encoder.*):\n  "
            + "\n  ".join(problems) + hint + "\nCheck --bert-config / --bert-model.")
    model.load_state_dict(mapped, strict=True)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_pformer.convert_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="reference checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="output P-Former checkpoint (pformer.pth)")
    parser.add_argument("--llm-name", required=True, help="LLM the reference P-Former was trained against")
    parser.add_argument("--num-query-token", type=int, required=True)
    parser.add_argument("--bert-model", required=True, help="BERT hub name or local dir (recorded; tokenizer)")
    parser.add_argument("--bert-config", help="BERT config.json (default: BertConfig.from_pretrained(--bert-model))")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read --src with weights_only=False (only for files you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.bert_config:
            bert_config = transformers.BertConfig.from_json_file(args.bert_config)
        else:
            bert_config = transformers.BertConfig.from_pretrained(args.bert_model)
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: cannot read the BERT config ({e}); pass --bert-config path/config.json\n")
    try:
        ckpt = torch.load(args.src, map_location="cpu", weights_only=not args.allow_pickle)
    except Exception as e:
        parser.exit(2, f"error: cannot read {args.src!r}: {type(e).__name__}: {e}\n"
                       "(if the file holds non-tensor objects and you trust it, add --allow-pickle)\n")
    state_dict = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    try:
        model = convert_reference_state_dict(state_dict, bert_config, args.num_query_token, args.llm_name,
                                             args.bert_model)
        model.save(args.out)
        reloaded = PFormer.load(args.out, num_query_token=args.num_query_token,
                                llm_hidden_size=model.llm_hidden_size, llm_name=args.llm_name)
    except (ReferenceConversionError, PFormerCheckpointError) as e:
        parser.exit(2, f"error: {e}\n")
    expected = model.state_dict()
    if any(not torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items()):
        parser.exit(2, f"error: {args.out!r} reloads with different weights\n")
    logger.info("wrote %s (num_query_token=%d, llm_hidden_size=%d, llm_name=%s) and verified it by reloading",
                args.out, model.num_query_token, model.llm_hidden_size, model.llm_name)


if __name__ == "__main__":
    main()
