"""Shared fixtures: tiny backbones built offline once per session, and a 1-rank process group per module.

Helpers that are not fixtures are in helpers.py."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def annotation_cache(tmp_path_factory):
    """The annotation cache folder of the builders (lavis_pformer.datasets.arrow_cache), for this test session and
    the processes it starts; not the user's ~/.cache."""
    folder = str(tmp_path_factory.mktemp("annotation_cache"))
    before = os.environ.get("LAVIS_PFORMER_CACHE")
    os.environ["LAVIS_PFORMER_CACHE"] = folder
    yield folder
    if before is None:
        os.environ.pop("LAVIS_PFORMER_CACHE", None)
    else:
        os.environ["LAVIS_PFORMER_CACHE"] = before


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
