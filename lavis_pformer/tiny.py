"""Tiny BERT / OPT / Flan-T5-like / ViT backbones and a small shapes world, built offline in seconds.

They are saved with ``save_pretrained`` so that models load them through the same code path as the
real hub models (``bert_model: <dir>``, ``opt_model: <dir>``, ``t5_model: <dir>``). Tokenizers are
trained locally: a WordPiece vocabulary for BERT, a byte-level BPE for OPT (``"\\n"`` is a token, as
BLIP-2 OPT uses it as end of text) and a sentencepiece model for T5.

    python -m lavis_pformer.tiny --out output/tiny
"""
import argparse
import json
import os
import string

import torch

from lavis_pformer.synthetic.shapes_world import generate

# Words the tiny tokenizers know as whole tokens; anything else is split into characters.
WORDS = (
    "a an the of and or in on at to with is are was there this that it its what which how many "
    "question short answer photo picture image left right top bottom middle center corner "
    "red green blue yellow purple orange black white gray brown pink small large big "
    "circle square triangle star shape shapes object objects one two three four zero yes no "
    "man woman dog cat bird car tree street table sitting standing next near above below "
    "color colour count number of"
).split()

SIZES = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "opt": dict(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4),
    "t5": dict(d_model=40, d_kv=10, d_ff=80, num_layers=2, num_decoder_layers=2, num_heads=4),
    "vit": dict(patch_size=8, embed_dim=32, depth=1, num_heads=4),
}


def _corpus(repeats=20):
    """Training text for the tokenizers: the word list, in simple sentences."""
    lines = []
    for i in range(repeats):
        words = WORDS[i % 7 :] + WORDS[: i % 7]
        for j in range(0, len(words), 8):
            lines.append(" ".join(words[j : j + 8]) + ".")
    lines.append(string.ascii_letters + string.digits + string.punctuation)
    return lines


def build_bert(out_dir, seed=0, **sizes):
    """Tiny BERT (WordPiece vocabulary of characters + ``WORDS``); ``sizes`` override ``SIZES["bert"]`` and may
    set any ``BertConfig`` key (e.g. ``hidden_dropout_prob``)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    os.makedirs(out_dir, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w in dict.fromkeys(WORDS) if w not in vocab]
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file, do_lower_case=True)
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=128, **{**SIZES["bert"], **sizes})
    BertForMaskedLM(config).save_pretrained(out_dir)
    return out_dir


def build_opt(out_dir, seed=0, vocab_size=400, **sizes):
    """Tiny OPT (byte-level BPE on ``WORDS``); ``sizes`` override ``SIZES["opt"]`` (any ``OPTConfig`` key)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    # OPT's special tokens: <s>=0, <pad>=1, </s>=2 (bos = eos), <unk>=3.
    bpe.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
    )
    bpe.save_model(out_dir)
    tokenizer = GPT2Tokenizer(
        os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
        bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True,
    )
    tokenizer.save_pretrained(out_dir)
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1, "'\\n' must be one token"
    torch.manual_seed(seed)
    sizes = {**SIZES["opt"], **sizes}
    config = OPTConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, word_embed_proj_dim=sizes["hidden_size"],
        pad_token_id=1, bos_token_id=2, eos_token_id=2, do_layer_norm_before=True, **sizes,
    )
    OPTForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def build_t5(out_dir, seed=0, vocab_size=200, **sizes):
    """Tiny Flan-T5-like model (sentencepiece on ``WORDS``); ``sizes`` override ``SIZES["t5"]`` (any ``T5Config``
    key)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_t5_tokenizer(out_dir, _corpus(), vocab_size)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, **{**SIZES["t5"], **sizes},
    )
    T5ForConditionalGeneration(config).save_pretrained(out_dir)
    return out_dir


def build_t5_tokenizer(out_dir, sentences, vocab_size, model_type="unigram"):
    """T5's tokenizer (pad 0, eos 1, unk 2, no bos): a sentencepiece model (``model_type`` "unigram" as T5's, or
    "bpe") trained on ``sentences`` (at most ``vocab_size`` pieces, fewer if the text holds fewer), saved under
    ``out_dir`` as the slow (spiece.model) and the fast (tokenizer.json) tokenizer; returns the slow one. The files
    name no path, so the same sentences give the same bytes wherever they are built.

    The fast tokenizer's conversion needs the protobuf that requirements-verified.txt pins (3.20.x).
    """
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer, T5TokenizerFast

    from lavis_pformer.backbones import sentencepiece_conversion_errors

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type=model_type,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path = os.path.join(out_dir, "spiece.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    tokenizer = T5Tokenizer(path, extra_ids=0)
    tokenizer.save_pretrained(out_dir)
    with sentencepiece_conversion_errors():  # tokenizer.json, as hub T5 models ship it: no conversion at load time
        T5TokenizerFast(path, extra_ids=0).save_pretrained(out_dir)
    return tokenizer


def build_vit(path, seed=0, image_size=32, **sizes):
    """Weights of a tiny ``custom_vit`` (its ``vit_config``: ``SIZES["vit"]`` updated with ``sizes``), so every stage
    sees the same ViT."""
    from lavis_pformer.backbones import custom_vit

    torch.manual_seed(seed)
    vit = custom_vit(image_size, {**SIZES["vit"], **sizes})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(vit.state_dict(), path)
    return path


def build_all(root, seed=0, sizes=None):
    """Build ``root/backbones/{bert,opt,t5,vit.pth}`` and a small shapes world in ``root/world``.

    ``sizes`` ({"bert"|"opt"|"t5"|"vit": {key: value}}) override parts of ``SIZES``; the sizes used are written
    to ``root/backbones/sizes.json``. Returns the paths: bert, opt, t5, vit, world (folder) and sentences (its
    stage-0 corpus).
    """
    sizes = {name: {**default, **(sizes or {}).get(name, {})} for name, default in SIZES.items()}
    world = generate(os.path.join(root, "world"), seed=seed, n_train=64, n_val=16, n_test=16, n_corpus=512, n_vision=0)
    paths = {
        "bert": build_bert(os.path.join(root, "backbones", "bert"), seed, **sizes["bert"]),
        "opt": build_opt(os.path.join(root, "backbones", "opt"), seed, **sizes["opt"]),
        "t5": build_t5(os.path.join(root, "backbones", "t5"), seed, **sizes["t5"]),
        "vit": build_vit(os.path.join(root, "backbones", "vit.pth"), seed, **sizes["vit"]),
        "world": world["root"],
        "sentences": world["sentences"],
    }
    with open(os.path.join(root, "backbones", "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="output/tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in build_all(args.out, args.seed).items():
        print(f"{name}: {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
