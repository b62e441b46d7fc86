"""Tests of the P-Former LAVIS tasks: per-term loss stats and the non-finite loss guard."""

import logging

import lavis.common.optims  # noqa: F401  (registers the lr schedulers)
import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_pformer.tasks import LossTermLoggingMixin, NonFiniteLossError

A = [0.5, 1.0, 2.0, 4.5]
B = [3.0, 1.0, 0.25, 0.0]


class FakeModel(torch.nn.Module):
    """Returns loss = w^2 + loss_a + loss_b with scripted term values per iteration."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.nan_at = nan_at

    def forward(self, samples):
        i = samples["iters"]
        loss_a, loss_b = torch.tensor(A[i]), torch.tensor(B[i])
        loss = self.w**2 + loss_a + loss_b
        if i == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "loss_a": loss_a, "loss_b": loss_b, "logits": torch.zeros(2)}


class Loader:
    """A plain iterator with __len__, as the runner's loaders are."""

    def __init__(self, n):
        self.batches = iter([{"instance_id": [f"{k}a", f"{k}b"]} for k in range(n)])
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)


def _train_epoch(task, model, log_freq=2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = registry.get_lr_scheduler_class("linear_warmup_cosine_lr")(
        optimizer, max_epoch=2, min_lr=1e-5, init_lr=1e-3, warmup_steps=2, warmup_start_lr=1e-6
    )
    return task.train_epoch(
        epoch=0, model=model, data_loader=Loader(len(A)), optimizer=optimizer,
        lr_scheduler=scheduler, cuda_enabled=False, log_freq=log_freq,
    )


def test_train_epoch_reports_loss_term_averages(caplog):
    task = registry.get_task_class("pformer_pretrain").setup_task(cfg=None)
    model = FakeModel()
    with caplog.at_level(logging.INFO):
        stats = _train_epoch(task, model)
    assert stats["loss_a"] == "{:.3f}".format(sum(A) / len(A))
    assert stats["loss_b"] == "{:.3f}".format(sum(B) / len(B))
    assert {"loss", "lr"} <= set(stats) and "logits" not in stats
    assert model.w.item() != 1.0  # the optimizer stepped
    assert task.loss_terms.meters["loss_a"].count == len(A)
    assert caplog.text.count("epoch 0 iter") == 2  # iterations 0 and 2 with log_freq 2
    assert "Averaged loss terms" in caplog.text

    stats = _train_epoch(task, FakeModel())  # meters restart each epoch
    assert task.loss_terms.meters["loss_a"].count == len(A)
    assert stats["loss_a"] == "{:.3f}".format(sum(A) / len(A))


def test_nan_loss_raises_with_ids_and_terms():
    task = registry.get_task_class("pformer_pretrain").setup_task(cfg=None)
    with pytest.raises(RuntimeError) as err:
        _train_epoch(task, FakeModel(nan_at=1))
    assert isinstance(err.value, (NonFiniteLossError, FloatingPointError))
    msg = str(err.value)
    assert "epoch 0 iteration 1" in msg and "'1a', '1b'" in msg
    assert "'loss': nan" in msg and "'loss_a': 1.0" in msg and "'loss_b': 1.0" in msg


def test_registered_tasks_keep_lavis_setup():
    cfg = OmegaConf.create(
        {"run_cfg": {"num_beams": 3, "max_len": 20, "min_len": 5, "evaluate": False}}
    )
    cap = registry.get_task_class("captioning_pformer").setup_task(cfg=cfg)
    assert (cap.num_beams, cap.max_len, cap.min_len, cap.report_metric) == (3, 20, 5, True)
    itp = registry.get_task_class("image_text_pretrain_pformer").setup_task(cfg=cfg)
    pre = registry.get_task_class("pformer_pretrain").setup_task(cfg=cfg)
    for task in (cap, itp, pre):
        assert isinstance(task, LossTermLoggingMixin) and task.inst_id_key == "instance_id"
    assert pre.valid_step(None, {}) == []
    assert itp.evaluation(None, None) is None
