"""LAVIS tasks of lavis-pformer: per-term loss logging and a non-finite loss guard.

LAVIS 1.0.2's training loop logs only ``loss``. ``LossTermLoggingMixin`` wraps ``train_step`` and
``train_epoch`` / ``train_iters`` (the loop itself is LAVIS's, untouched) so that every ``loss_*``
entry of the model output is averaged per epoch, logged every ``log_freq`` steps and added to the
epoch stats that the runner writes to log.txt. The model must return the same ``loss_*`` keys on
every step and rank, since the meters are all-reduced key by key.

With ``run.amp: True`` on the CPU the plugin's runners set ``cpu_amp``: each training step runs under CPU
autocast (fp16) where LAVIS's loop uses CUDA autocast, the closest check of a GPU run that a CPU allows.

``image_text_pretrain_pformer`` and ``captioning_pformer`` also build the model with
``from_config(cfg, for_training=not run.evaluate)`` so that the frozen P-Former teacher of stages 1/2
exists only in training runs (``AlignmentTeacherTaskMixin``); ``captioning_pformer`` scores captions
offline against a local COCO-format ground truth (``LocalCaptionMetricsMixin``).
"""

import contextlib
import inspect
import json
import logging
import math
import os

import torch
from lavis.common.dist_utils import main_process
from lavis.common.logger import MetricLogger
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from lavis.tasks.captioning import CaptionTask
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask

from lavis_pformer.caption_eval import caption_metrics
from lavis_pformer.errors import UserError
from lavis_pformer.precision import cpu_autocast


class NonFiniteLossError(UserError, FloatingPointError, RuntimeError):
    """The total training loss is NaN or infinite."""


def _batch_ids(samples):
    ids = samples.get("instance_id", samples.get("image_id"))
    return ids.tolist() if torch.is_tensor(ids) else ids


class LossTermLoggingMixin:
    """Records, logs and reports the ``loss_*`` terms of the model output; refuses NaN/inf loss.

    Put it before the LAVIS task class in the bases.
    """

    # Set by the plugin's runners for ``run.amp: True`` on the CPU: LAVIS's loop wraps the step in CUDA autocast,
    # which does nothing to CPU tensors, so the step runs under CPU autocast (fp16) here instead.
    cpu_amp = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_terms = MetricLogger(delimiter="  ")
        self._log_freq = 50

    def train_step(self, model, samples):
        with cpu_autocast(torch.float16) if self.cpu_amp else contextlib.nullcontext():
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
                f"{samples.get('iters')}: {dict(zip(names, values))}; batch ids: {_batch_ids(samples)}. "
                "The checkpoints already written are intact: check these samples and the non-finite term, "
                "lower run.init_lr (or turn run.amp off), then continue from the last good checkpoint with "
                "--options run.resume_ckpt_path=<run folder>/checkpoint_last.pth"
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


# model.teacher_precision when the config gives none, by run.device: half the teacher's memory on a GPU, where
# the training step runs in fp16 anyway; fp32 on the CPU (no autocast by default, and CPU half kernels are slow).
TEACHER_PRECISION_BY_DEVICE = {"cuda": "fp16", "cpu": "fp32"}


class AlignmentTeacherTaskMixin:
    """Builds the model with its P-Former teacher when the run trains (``run.evaluate`` False).

    The plugin's BLIP-2 models take ``from_config(cfg, for_training)``: the frozen P-Former teacher is
    loaded only for training, so evaluation and ``load_model`` never need it. Models whose
    ``from_config`` has no ``for_training`` (stock LAVIS ``blip2_opt``...) are built as LAVIS does.
    A training run without ``model.teacher_precision`` gets the default of its ``run.device``
    (``TEACHER_PRECISION_BY_DEVICE``).
    """

    def build_model(self, cfg):
        model_cfg = cfg.model_cfg
        model_cls = registry.get_model_class(model_cfg.arch)
        if "for_training" not in inspect.signature(model_cls.from_config).parameters:
            return model_cls.from_config(model_cfg)
        for_training = not cfg.run_cfg.get("evaluate", False)
        if for_training and model_cfg.get("teacher_precision") is None:
            device = torch.device(str(cfg.run_cfg.get("device", "cuda"))).type
            model_cfg.teacher_precision = TEACHER_PRECISION_BY_DEVICE.get(device, "fp32")
        return model_cls.from_config(model_cfg, for_training=for_training)


@registry.register_task("pformer_pretrain")
class PFormerPretrainTask(LossTermLoggingMixin, BaseTask):
    """Text-only P-Former stage 0: train only, no evaluation metric."""

    def valid_step(self, model, samples):
        return []


@registry.register_task("image_text_pretrain_pformer")
class ImageTextPretrainPFormerTask(AlignmentTeacherTaskMixin, LossTermLoggingMixin, ImageTextPretrainTask):
    """LAVIS ``image_text_pretrain`` with per-term loss logging and the P-Former teacher (stages 1 and 2)."""


class LocalCaptionMetricsMixin:
    """Caption metrics against the eval dataset's local COCO-format GT (``dataset.coco_gt_file``).

    LAVIS's CaptionTask always downloads the Karpathy GT and runs SPICE; with a local GT file this
    scores offline (SPICE only with ``run.caption_spice: True``). Without one, LAVIS's path is used.
    """

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.spice = bool(cfg.run_cfg.get("caption_spice", False))
        return task

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self.coco_gt_file = getattr(dataset, "coco_gt_file", None)

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        if not getattr(self, "coco_gt_file", None):
            return super()._report_metrics(eval_result_file=eval_result_file, split_name=split_name)
        metrics = caption_metrics(self.coco_gt_file, eval_result_file, spice=getattr(self, "spice", False))
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps({split_name: metrics}) + "\n")
        return {**metrics, "agg_metrics": metrics["CIDEr"] + metrics["Bleu_4"]}


@registry.register_task("captioning_pformer")
class CaptionPFormerTask(LocalCaptionMetricsMixin, AlignmentTeacherTaskMixin, LossTermLoggingMixin, CaptionTask):
    """LAVIS ``captioning`` with offline metrics on a local GT, per-term loss logging and the P-Former
    teacher (caption fine-tuning and caption evaluation)."""
