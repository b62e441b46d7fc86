"""LAVIS tasks of lavis-pformer: per-term loss logging and a non-finite loss guard.

LAVIS 1.0.2's training loop logs only ``loss``. ``LossTermLoggingMixin`` wraps ``train_step`` and
``train_epoch`` / ``train_iters`` (the loop itself is LAVIS's, untouched) so that every ``loss_*``
entry of the model output is averaged per epoch, logged every ``log_freq`` steps and added to the
epoch stats that the runner writes to log.txt. The model must return the same ``loss_*`` keys on
every step and rank, since the meters are all-reduced key by key.
"""

import logging
import math

import torch
from lavis.common.logger import MetricLogger
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from lavis.tasks.captioning import CaptionTask
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """The total training loss is NaN or infinite."""


def _batch_ids(samples):
    ids = samples.get("instance_id", samples.get("image_id"))
    return ids.tolist() if torch.is_tensor(ids) else ids


class LossTermLoggingMixin:
    """Records, logs and reports the ``loss_*`` terms of the model output; refuses NaN/inf loss.

    Put it before the LAVIS task class in the bases.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_terms = MetricLogger(delimiter="  ")
        self._log_freq = 50

    def train_step(self, model, samples):
        output = model(samples)
        loss = output["loss"]
        names = ["loss"] + [k for k in output if k.startswith("loss_")]
        values = torch.stack(
            [torch.as_tensor(output[k], device=loss.device).detach().float().reshape(()) for k in names]
        ).tolist()
        terms = dict(zip(names, values))
        if not math.isfinite(terms.pop("loss")):
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {samples.get('epoch')} iteration "
                f"{samples.get('iters')}: {dict(zip(names, values))}; batch ids: {_batch_ids(samples)}"
            )
        self.loss_terms.update(**terms)
        if terms and samples.get("iters", 0) % self._log_freq == 0:
            logging.info(
                "epoch %s iter %s/%s  %s",
                samples.get("epoch"), samples.get("iters"),
                samples.get("num_iters_per_epoch"), self.loss_terms,
            )
        return loss

    def train_epoch(
        self, epoch, model, data_loader, optimizer, lr_scheduler,
        scaler=None, cuda_enabled=False, log_freq=50, accum_grad_iters=1,
    ):
        self._start_loss_terms(log_freq)
        stats = super().train_epoch(
            epoch=epoch, model=model, data_loader=data_loader, optimizer=optimizer,
            lr_scheduler=lr_scheduler, scaler=scaler, cuda_enabled=cuda_enabled,
            log_freq=log_freq, accum_grad_iters=accum_grad_iters,
        )
        return self._finish_loss_terms(stats)

    def train_iters(
        self, epoch, start_iters, iters_per_inner_epoch, model, data_loader, optimizer,
        lr_scheduler, scaler=None, cuda_enabled=False, log_freq=50, accum_grad_iters=1,
    ):
        self._start_loss_terms(log_freq)
        stats = super().train_iters(
            epoch=epoch, start_iters=start_iters, iters_per_inner_epoch=iters_per_inner_epoch,
            model=model, data_loader=data_loader, optimizer=optimizer,
            lr_scheduler=lr_scheduler, scaler=scaler, cuda_enabled=cuda_enabled,
            log_freq=log_freq, accum_grad_iters=accum_grad_iters,
        )
        return self._finish_loss_terms(stats)

    def _start_loss_terms(self, log_freq):
        self.loss_terms = MetricLogger(delimiter="  ")
        self._log_freq = max(1, int(log_freq))

    def _finish_loss_terms(self, stats):
        self.loss_terms.synchronize_between_processes()
        if self.loss_terms.meters:
            logging.info("Averaged loss terms: " + self.loss_terms.global_avg())
        stats.update(
            {k: "{:.3f}".format(m.global_avg) for k, m in self.loss_terms.meters.items()}
        )
        return stats


@registry.register_task("pformer_pretrain")
class PFormerPretrainTask(LossTermLoggingMixin, BaseTask):
    """Text-only P-Former stage 0: train only, no evaluation metric."""

    def valid_step(self, model, samples):
        return []


@registry.register_task("image_text_pretrain_pformer")
class ImageTextPretrainPFormerTask(LossTermLoggingMixin, ImageTextPretrainTask):
    """LAVIS ``image_text_pretrain`` with per-term loss logging (stage 1 and 2)."""


@registry.register_task("captioning_pformer")
class CaptionPFormerTask(LossTermLoggingMixin, CaptionTask):
    """LAVIS ``captioning`` with per-term loss logging (captioning fine-tune)."""
