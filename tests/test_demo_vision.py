"""Pretraining of the demo's tiny ViT (lavis_pformer.demo.vision_pretrain) on a tiny shapes world."""
import json
import os

import pytest
import torch

from lavis_pformer.backbones import custom_vit
from lavis_pformer.synthetic import shapes_world
from lavis_pformer.demo import vision_pretrain as V

VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vision_world"))
    shapes_world.generate(root, seed=0, n_train=4, n_val=8, n_test=4, n_corpus=0, n_vision=64)
    out = os.path.join(root, "vit.pth")
    logs = []
    report = V.pretrain_vit(root, out, VIT, steps=40, batch_size=32, lr=3e-3, log_every=10, log=logs.append)
    return root, out, report, logs


def test_token_quadrants_follow_the_world_reading_order():
    # a 4x4 grid of patches: rows 0-1 are the top quadrants, columns 0-1 the left ones
    assert V.token_quadrants(4).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert V.token_quadrants(2).tolist() == [0, 1, 2, 3]  # patch 16 on 32 px: one token per quadrant


def test_token_targets_give_each_token_its_quadrant_contents():
    colour, shape = V.quadrant_labels([{"objects": [[1, "green", "square"]]}])
    tc, ts, tq = V.token_targets(colour, shape, V.token_quadrants(4))
    top_right = V.token_quadrants(4) == 1
    assert (tc[0, top_right] == V.COLOUR_IDS["green"]).all() and (tc[0, ~top_right] == 0).all()
    assert (ts[0, top_right] == V.SHAPE_IDS["square"]).all() and (ts[0, ~top_right] == 0).all()
    assert tq.tolist() == [V.token_quadrants(4).tolist()]


def test_quadrant_labels():
    colour, shape = V.quadrant_labels([{"objects": [[0, "red", "circle"], [3, "blue", "triangle"]]}])
    assert colour.tolist() == [[V.COLOUR_IDS["red"], 0, 0, V.COLOUR_IDS["blue"]]]
    assert shape.tolist() == [[V.SHAPE_IDS["circle"], 0, 0, V.SHAPE_IDS["triangle"]]]


def test_pretraining_writes_a_vit_that_custom_vit_loads(pretrained):
    root, out, report, logs = pretrained
    with open(out + ".json") as f:
        saved = json.load(f)
    history = saved["loss_history"]
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["loss"] < history[0]["loss"]
    acc = saved["val_token_accuracy"]
    assert set(acc) == {"colour", "shape", "both", "quadrant"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["both"] <= min(acc["colour"], acc["shape"])
    vit = custom_vit(32, dict(VIT, checkpoint=out))  # strict load of the saved state dict
    state = torch.load(out, weights_only=True)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())
    assert any("step 40/40" in line for line in logs)


def test_empty_vision_set_is_a_clear_error(tmp_path):
    shapes_world.generate(str(tmp_path), seed=0, n_train=2, n_val=2, n_test=2, n_corpus=0, n_vision=0)
    with pytest.raises(ValueError, match="n_vision"):
        V.pretrain_vit(str(tmp_path), str(tmp_path / "vit.pth"), VIT, steps=1)
