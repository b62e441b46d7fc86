"""Shared fixtures: tiny backbones built offline once per session, and a 1-rank process group per module.

Helpers that are not fixtures are in helpers.py."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny backbones and sentence corpus: keys bert, opt, t5, sentences."""
    from lavis_pformer.tiny import build_all

    return build_all(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def process_group():
    """A 1-rank gloo group, as train.py starts without torchrun (LAVIS's Blip2Qformer.forward calls
    dist.get_rank()); ended after the module if this fixture or the module's code (cli.build) started it."""
    import torch.distributed as dist

    existed = dist.is_initialized()
    if not existed:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()
