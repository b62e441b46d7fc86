"""The verified install loads any sentencepiece tokenizer with no environment variable: transformers 4.26
converts a T5 folder without tokenizer.json through protobuf-3 generated code, which protobuf >= 4 refuses
("Descriptors cannot be created directly") unless PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python is set."""
import os
import re
import subprocess
import sys

from helpers import REPO

LOAD = ("import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(type(t).__name__, t('a red circle at the top').input_ids)")


def test_requirements_pin_protobuf_3():
    pins = open(os.path.join(REPO, "requirements-verified.txt")).read()
    assert re.search(r"^protobuf==3\.20\.\d+$", pins, re.M), "requirements-verified.txt must pin protobuf 3.20.x"
    setup = open(os.path.join(REPO, "setup.py")).read()
    assert '"protobuf<4"' in setup


def test_sentencepiece_t5_tokenizer_without_tokenizer_json_loads_without_env_var(tmp_path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    lines = [f"a {c} {s} at the {p} of the picture" for c in ("red", "blue", "green") for s in ("circle", "square")
             for p in ("top", "bottom", "left", "right")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    T5Tokenizer(str(tmp_path / "spiece.model"), extra_ids=0).save_pretrained(str(tmp_path))  # the slow files only
    assert not (tmp_path / "tokenizer.json").exists()
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    import google.protobuf

    assert proc.returncode == 0, (
        f"protobuf {google.protobuf.__version__} is installed; `make install` installs the pinned version\n"
        + proc.stderr[-2000:])
    assert proc.stdout.startswith("T5TokenizerFast [")  # converted from the sentencepiece model
