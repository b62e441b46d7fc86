"""What stages 1 and 2 (and video) add to a LAVIS BLIP-2 model: the frozen P-Former teacher and ``loss_align``.

``PFormerAlignmentMixin`` goes first in the bases, before the plugin's other mixins and the LAVIS class::

    class Blip2QformerPFormer(PFormerAlignmentMixin, Stage1CheckpointMixin, BackboneMixin, Blip2Qformer): ...
    class Blip2OPTPFormer(PFormerAlignmentMixin, Stage2Mixin, FrozenOPTMixin, LemmatizerMixin,
                          Stage2CheckpointMixin, BackboneMixin, Blip2OPT): ...

The model's own ``forward`` stays LAVIS's: the mixin runs ``super().forward(samples)`` while a forward
hook captures the FIRST output of one submodule (``alignment_source()``: ``Qformer.bert`` in stage 1,
whose first call in ``Blip2Qformer.forward`` is the image-only query pass; ``opt_proj`` / ``t5_proj`` in
stage 2), turns it into the predicted prompt [B, Q, H_llm] (``alignment_prediction``) and adds
``loss_align = alignment_weight * MSE(prediction, P-Former prompt of the caption)``.

The teacher exists only when the model is built for training with a positive weight
(``setup_alignment(..., for_training=True)``; the ``*_pformer`` tasks pass ``for_training`` from
``run.evaluate``). Inference (``load_model``, evaluation runs) never needs the P-Former. Its keys come read and
checked, as one :class:`~lavis_pformer.model_keys.AlignmentKeys`, from the model's ``from_config``; what the
model was aligned to is recorded in its checkpoints (:mod:`~lavis_pformer.checkpoints.records`).

Requirements on the host class: ``self.tokenizer`` (the model's BERT tokenizer) and ``self.max_txt_len``
exist when ``setup_alignment`` is called; the subclass implements ``alignment_source``,
``alignment_prediction`` and ``lavis_loss_terms`` (and may override ``prepare_lavis_samples`` /
``alignment_texts``).
"""
import contextlib
import logging

import torch
from omegaconf import OmegaConf

from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_pformer.losses import alignment_loss
from lavis_pformer.errors import ConfigError, SetupError
from lavis_pformer.model_keys import starting_checkpoint_key
from lavis_pformer.pformer import PFormer, PFormerCheckpointError
from lavis_pformer.precision import DTYPES, LOW_PRECISION

TEACHER = "pformer_teacher"

# Which task a model needs so that it is built with its teacher (see lavis_pformer.tasks).
TRAINING_TASKS = "image_text_pretrain_pformer (pre-training stages 1 and 2) or captioning_pformer (caption fine-tuning)"


class AlignmentSetupError(ConfigError):
    """The model config does not allow building the P-Former teacher."""


@contextlib.contextmanager
def capture_first_output(module):
    """Collects the output of the first call of ``module`` inside the ``with`` block.

    >>> with capture_first_output(model.opt_proj) as captured:
    ...     out = model(samples)
    >>> captured[0]  # opt_proj's output in that forward
    """
    captured = []

    def hook(_module, _inputs, output):
        if not captured:
            captured.append(output)

    handle = module.register_forward_hook(hook, prepend=True)  # before any hook that changes the output
    try:
        yield captured
    finally:
        handle.remove()


def strip_prompt(text, prompt):
    """``text`` without a leading generation prompt (e.g. "a photo of " added by the caption processor)."""
    prompt = (prompt or "").strip()
    if prompt and text.startswith(prompt):
        return text[len(prompt):].strip()
    return text


class PFormerAlignmentMixin:
    """Frozen P-Former teacher + ``loss_align`` on top of a LAVIS BLIP-2 model (see the module docstring)."""

    # Paper defaults (docs/method.md): w1 = 10 (stage 1), w2 = 100 (stage 2). Subclasses set theirs.
    DEFAULT_ALIGNMENT_WEIGHT = None
    # The teacher runs in model.teacher_precision under its own autocast: a half teacher must not make
    # BackboneMixin.maybe_autocast run fp32 backbones under CPU autocast.
    OWN_PRECISION = (TEACHER + ".",)

    def setup_alignment(self, alignment, num_query_token, llm_hidden_size=None, llm_name=None, for_training=False):
        """Build the frozen teacher when ``for_training and alignment.alignment_weight > 0``; returns it (or None).

        ``alignment``: :class:`~lavis_pformer.model_keys.AlignmentKeys`. Loading is strict (``PFormer.load``):
        ``num_query_token``, ``llm_hidden_size`` and ``llm_name`` must match the checkpoint's metadata when given
        (None: not checked), and the teacher's BERT vocabulary must have the size of this model's BERT tokenizer.
        The loaded (fp32) teacher is then cast to ``alignment.teacher_precision`` (fp32 / fp16 / bf16): it is never
        saved, so the file stays as stage 0 wrote it.
        """
        teacher_precision = alignment.teacher_precision
        self.alignment_weight = alignment.alignment_weight
        self.pformer_checkpoint = alignment.pformer_checkpoint
        self.pformer_teacher = None
        if not (for_training and self.alignment_weight > 0):
            why = "alignment_weight is 0 (BLIP-2 baseline)" if self.alignment_weight <= 0 else \
                "the model is built for inference/evaluation (for_training=False)"
            logging.info("%s: no P-Former teacher: %s", type(self).__name__, why)
            return None
        if not self.pformer_checkpoint:
            raise AlignmentSetupError(
                f"{type(self).__name__}: model.alignment_weight is {self.alignment_weight:g} but "
                "model.pformer_checkpoint is not set. Set model.pformer_checkpoint to the pformer.pth that "
                "stage 0 wrote (e.g. --options model.pformer_checkpoint=output/.../pformer.pth), or set "
                "`alignment_weight: 0` to train the plain BLIP-2 baseline."
            )
        teacher = PFormer.load(self.pformer_checkpoint, num_query_token=num_query_token,
                               llm_hidden_size=llm_hidden_size, llm_name=llm_name)
        vocab = self.tokenizer.vocab_size
        if teacher.bert_config.vocab_size != vocab:
            raise PFormerCheckpointError(
                f"P-Former checkpoint {self.pformer_checkpoint!r} has a BERT vocabulary of "
                f"{teacher.bert_config.vocab_size} tokens but this model's BERT tokenizer "
                f"(model.bert_model={getattr(self, 'bert_model', '?')!r}) has {vocab}: the teacher would read "
                "wrong token ids. Use the bert_model the P-Former was trained with (its metadata says "
                f"{teacher.bert_model!r})."
            )
        if teacher.bert_model and teacher.bert_model != getattr(self, "bert_model", teacher.bert_model):
            logging.warning("P-Former was trained with bert_model %r, this model uses %r (same vocabulary size)",
                            teacher.bert_model, self.bert_model)
        for p in teacher.parameters():
            p.requires_grad = False
        self.pformer_teacher = teacher.to(DTYPES[teacher_precision]).eval()
        self.exclude_from_checkpoint(TEACHER + ".")
        logging.info(
            "P-Former teacher %s: Q=%d, LLM %s (width %d), %s, alignment_weight %g",
            self.pformer_checkpoint, teacher.num_query_token, teacher.llm_name, teacher.llm_hidden_size,
            teacher_precision, self.alignment_weight,
        )
        return teacher

    def train(self, mode=True):
        """LAVIS's runner calls model.train() every epoch: the teacher stays in eval mode (no dropout)."""
        super().train(mode)
        if getattr(self, TEACHER, None) is not None:
            self.pformer_teacher.eval()
        return self

    # --- hooks: the host class defines (no stubs here, so that mixins later in the bases can provide them)
    #   alignment_source(self) -> nn.Module whose first output in super().forward leads to the prediction
    #   alignment_prediction(self, captured) -> predicted prompt [B, Q, H_llm] (with grad)
    #   lavis_loss_terms(self, output) -> {"loss_<term>": tensor}: every LAVIS term, without the total
    # and may override:

    def prepare_lavis_samples(self, samples):
        """Samples handed to LAVIS's forward (T5 splits the caption here)."""
        return samples

    def alignment_texts(self, samples):
        """The captions the teacher reads: ``text_input`` without a leading generation prompt."""
        texts = samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [strip_prompt(t, getattr(self, "prompt", "")) for t in texts]

    # --- the P-Former side ----------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_prompt(self, texts):
        """P-Former prompt of the unmasked captions: [B, Q, H_llm], no grad, teacher in eval mode.

        A half-precision teacher runs under autocast to its own dtype (matrix products in fp16 / bf16; on a GPU
        layer norms and softmax in fp32), whatever the training step's autocast; an fp32 teacher runs as the
        step does.
        """
        if self.pformer_teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no P-Former teacher")
        self.pformer_teacher.eval()
        weight = next(self.pformer_teacher.parameters())
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(weight.device)
        own_autocast = torch.autocast(weight.device.type, dtype=weight.dtype) if weight.dtype in LOW_PRECISION \
            else contextlib.nullcontext()
        with own_autocast:
            return self.pformer_teacher(tokens.input_ids, tokens.attention_mask).prompt

    def forward(self, samples):
        """LAVIS's forward + ``loss_align``: {"loss", every LAVIS ``loss_*`` term, "loss_align"}.

        ``loss_align`` is present whenever the model has a teacher; ``loss`` is the sum of the terms.
        """
        if self.training and self.alignment_weight > 0 and self.pformer_teacher is None:
            raise SetupError(
                f"{type(self).__name__} is training with alignment_weight={self.alignment_weight:g} but was built "
                "without its P-Former teacher (from_config(cfg, for_training=False), which LAVIS's stock tasks "
                f"and load_model do). Train with run.task {TRAINING_TASKS}, which build the teacher; or set "
                "model.alignment_weight: 0 for the plain BLIP-2 baseline."
            )
        align = self.pformer_teacher is not None
        texts = self.alignment_texts(samples) if align else None
        lavis_samples = self.prepare_lavis_samples(samples)
        capture = capture_first_output(self.alignment_source()) if align else contextlib.nullcontext([])
        with capture as captured:
            output = super().forward(lavis_samples)
        losses = dict(self.lavis_loss_terms(output))
        if align:
            if not captured:
                raise RuntimeError(f"{type(self).__name__}: {type(self.alignment_source()).__name__} was not called "
                                   "during LAVIS's forward; cannot compute loss_align")
            prediction = self.alignment_prediction(captured[0])
            target = self.teacher_prompt(texts).to(prediction.device)
            losses["loss_align"] = alignment_loss(prediction, target, self.alignment_weight)
        losses["loss"] = sum(losses.values())
        return losses

    # --- building -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_type):
        """``load_model`` / ``load_model_and_preprocess``: build from the model-type yaml, for inference.

        The plugin ships no weights: when the yaml's ``pretrained`` / ``finetuned`` path is empty the model
        is built from its backbones with a WARNING; load a checkpoint afterwards
        (``load_model(name, type, checkpoint=path)`` or ``model.load_checkpoint(path)``). Training and
        evaluation runs go through ``from_config``, where an empty path is an error.
        """
        cfg = OmegaConf.load(cls.default_config_path(model_type)).model
        key = starting_checkpoint_key(cfg)
        if key is not None and not cfg.get(key):
            logging.warning(
                "%s/%s: model.%s is empty, so no weights are loaded: the Q-Former and projection are random "
                "(the frozen ViT and LLM come from their own pretrained weights) until you load a checkpoint "
                "with load_model(..., checkpoint=path) or model.load_checkpoint(path).",
                cls.__name__, model_type, key,
            )
            cfg.load_finetuned = False
            cfg.load_pretrained = False
        return cls.from_config(cfg)


class LemmatizerMixin:
    """``apply_lemmatizer`` for ``predict_answers`` (OK-VQA): LAVIS Blip2T5's ``_lemmatize``, reused as is.

    The host sets ``self._apply_lemmatizer`` and ``self._lemmatizer = None`` in its constructor.
    """

    _lemmatize = Blip2T5._lemmatize

    @property
    def lemmatizer(self):
        """spaCy's en_core_web_sm, loaded on first use; a clear error (not LAVIS's exit(1)) without it."""
        if self._lemmatizer is None:
            try:
                import spacy

                self._lemmatizer = spacy.load("en_core_web_sm")
            except (ImportError, OSError) as e:
                raise SetupError(
                    "model.apply_lemmatizer is True but spaCy's en_core_web_sm cannot be loaded "
                    f"({type(e).__name__}: {e}); install it with `python -m spacy download en_core_web_sm` "
                    "or set model.apply_lemmatizer: False"
                ) from e
        return self._lemmatizer
