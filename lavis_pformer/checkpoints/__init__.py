"""What happens when a checkpoint is loaded into one of the plugin's models: the whole policy, in this package.

A model starts from the checkpoint its ``from_config`` was given (``model.finetuned`` with ``load_finetuned``,
else ``model.pretrained`` unless ``load_pretrained: False``; read by :mod:`lavis_pformer.model_keys`), from
``load_model(..., checkpoint=path)`` / ``model.load_checkpoint(path)``, or from LAVIS's resume and best-checkpoint
reload (``load_state_dict``). In the order ``load_checkpoint`` applies them:

1. :mod:`~lavis_pformer.checkpoints.files`: the file is read with ``torch.load(weights_only=True)``; a missing,
   truncated or unsafe file, or one without a state dict, is an error that names it.
2. :mod:`~lavis_pformer.checkpoints.loading` (``CheckpointMixin``): a ``finetuned`` checkpoint must come from a run
   of this model or its stock LAVIS twin (``compatible_archs``).
3. :mod:`~lavis_pformer.checkpoints.records` (``StageRecordsMixin``, stages 1, 2 and video): the record a checkpoint
   carries (``_extra_state``: what it was aligned to, its LLM, Q-Former shape and ViT) must fit this model.
4. :mod:`~lavis_pformer.checkpoints.stages`: a stage-1 checkpoint's ``llm_proj`` becomes stage 2's
   ``opt_proj`` / ``t5_proj`` and its stage-1-only tensors are dropped, as LAVIS does (``Stage2CheckpointMixin``);
   a stage-1 model built without ``llm_proj`` recreates it for a checkpoint that has one (``Stage1CheckpointMixin``).
5. ``CheckpointMixin`` again: loading is strict about trained tensors and lets frozen backbones be absent (the
   frozen LLM and the P-Former teacher are never saved: ``exclude_from_checkpoint``). A tensor of another shape, or
   one without a place in the model (trained work that would be thrown away, e.g. cross-attention layers of another
   ``cross_attention_freq``), is an error naming the config key to fix; a missing trainable tensor is a WARNING
   when starting from an earlier stage and an error for ``finetuned``.
6. ``StageRecordsMixin`` takes over what the record carries (what the model was aligned to; the weights of a random
   frozen ``custom_vit``).

Every refusal is a :class:`~lavis_pformer.errors.CheckpointError` (or ``MissingFileError``): a short message and
exit status 2 from ``train.py`` / ``evaluate.py``. The models use the most specific mixin they need:
``CheckpointMixin`` (stage 0), ``Stage1CheckpointMixin`` (stage 1), ``Stage2CheckpointMixin`` (stage 2),
``StageRecordsMixin`` (video), each before the LAVIS class in the bases.
"""
