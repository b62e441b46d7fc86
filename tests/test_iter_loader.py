"""The runner's IterLoader: LAVIS's epoch change without its 2-s pause when the loader has no workers."""
import torch
from torch.utils.data import DataLoader

import lavis.datasets.datasets.dataloader_utils as lavis_loaders

from lavis_pformer.runtime import NoPauseIterLoader


def _batches(loader, n):
    return [next(loader).tolist() for _ in range(n)]


def test_epoch_change_without_pause_same_order_as_lavis(monkeypatch):
    data = torch.arange(10)
    torch.manual_seed(0)
    ours = NoPauseIterLoader(DataLoader(data, batch_size=4, shuffle=True, drop_last=True), use_distributed=False)

    def no_sleep(seconds):
        raise AssertionError(f"slept {seconds}s at an epoch change of a loader without workers")

    monkeypatch.setattr(lavis_loaders.time, "sleep", no_sleep)
    got = _batches(ours, 7)  # 2 batches per epoch: 3 epoch changes
    assert ours.epoch == 3

    monkeypatch.setattr(lavis_loaders.time, "sleep", lambda seconds: None)
    torch.manual_seed(0)
    stock = lavis_loaders.IterLoader(DataLoader(data, batch_size=4, shuffle=True, drop_last=True), use_distributed=False)
    assert got == _batches(stock, 7) and stock.epoch == ours.epoch


def test_loader_with_workers_keeps_lavis_pause(monkeypatch):
    slept = []
    monkeypatch.setattr(lavis_loaders.time, "sleep", slept.append)
    loader = NoPauseIterLoader(DataLoader(torch.arange(4), batch_size=2, num_workers=1), use_distributed=False)
    assert _batches(loader, 3) == [[0, 1], [2, 3], [0, 1]]
    assert slept == [2]
