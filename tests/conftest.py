"""Shared fixtures: tiny backbones built offline once per session. Helpers that are not fixtures: helpers.py."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny backbones and sentence corpus: keys bert, opt, t5, sentences."""
    from lavis_pformer.tiny import build_all

    return build_all(str(tmp_path_factory.mktemp("tiny")))

