"""Loading a checkpoint: strict about trained tensors, frozen backbones allowed to be absent, no silent losses.

LAVIS's ``load_checkpoint`` / ``load_from_pretrained`` read files with ``torch.load``'s defaults and load with
``strict=False``, so that a tensor without a place in the model is dropped without a word. ``CheckpointMixin``
overrides them (and ``load_state_dict``, which LAVIS's resume and best-checkpoint reload call): files are read with
``weights_only=True``; a checkpoint tensor that has no place in the model (beyond what ``adapt_state_dict`` drops,
:mod:`~lavis_pformer.checkpoints.stages`) is an error that names the config key to fix, never a warning. Missing
trainable tensors are a WARNING when starting from an earlier stage (they start anew) and an error for
``finetuned``. The stage record of a checkpoint is checked and taken over by the hooks
``check_checkpoint_meta`` / ``apply_checkpoint_meta`` (:mod:`~lavis_pformer.checkpoints.records`).
"""
import logging

from lavis.common.utils import is_url

from lavis_pformer.checkpoints.files import (CROSS_ATTENTION, EXTRA_STATE_KEY, QFORMER_LAYER, checkpoint_arch,
                                             cross_attention_freq_of, cross_attention_layers, read_checkpoint,
                                             state_dict_of)
from lavis_pformer.errors import CheckpointError
from lavis_pformer.model_keys import starting_checkpoint


def _drop_non_checkpoint_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k[len(prefix):].startswith(module._non_checkpoint_prefixes)]:
        del state_dict[key]


class CheckpointMixin:
    """Put before the LAVIS class: ``class PFormerPretrain(CheckpointMixin, BackboneMixin, Blip2Base)``.

    Subclasses in this package add the stage records (``StageRecordsMixin``) and the stage-1 -> stage-2
    adaptation (``Stage1CheckpointMixin``, ``Stage2CheckpointMixin``) through the three hooks at the end.
    """

    # Archs whose checkpoints this model can evaluate as-is (besides its own), e.g. stock "blip2_opt".
    compatible_archs = ()

    # --- what a checkpoint holds ------------------------------------------------------------------------

    def exclude_from_checkpoint(self, *prefixes):
        """Never put these submodules (frozen LLM, P-Former teacher) into ``state_dict()``.

        LAVIS's runner drops frozen *parameters* from its checkpoints, but not tensors shared with
        them under another name (OPT's tied ``lm_head.weight``) nor buffers.
        """
        if not hasattr(self, "_non_checkpoint_prefixes"):
            self._non_checkpoint_prefixes = ()
            self._register_state_dict_hook(_drop_non_checkpoint_keys)
        self._non_checkpoint_prefixes += tuple(prefixes)

    def _not_in_checkpoint(self, key):
        """Keys a checkpoint may lack: frozen backbones, excluded modules, and the metadata (older checkpoints)."""
        return key == EXTRA_STATE_KEY or key.startswith(getattr(self, "_non_checkpoint_prefixes", ())) or key in {
            n for n, p in self.named_parameters() if not p.requires_grad
        }

    def load_state_dict(self, state_dict, strict=True):
        """Strict about what a checkpoint carries: trainable tensors; frozen backbones may be absent.

        (LAVIS's resume and best-checkpoint reload call this with strict=True.)
        """
        msg = super().load_state_dict(state_dict, strict=False)
        missing = [k for k in msg.missing_keys if not self._not_in_checkpoint(k)]
        if strict and (missing or msg.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing}, unexpected {msg.unexpected_keys}"
            )
        return msg

    # --- where a model starts -----------------------------------------------------------------------------

    def load_starting_checkpoint(self, start):
        """``start``: the :class:`~lavis_pformer.model_keys.StartingCheckpoint` that ``from_config`` read (a
        ``finetuned`` checkpoint must be complete), or None: the backbones alone."""
        if start is None:
            logging.info("load_pretrained is False: starting from the backbones alone")
            return None
        if start.complete:
            return self.load_checkpoint(start.path, require_complete=True)
        return self.load_from_pretrained(start.path)

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """LAVIS's ``BaseModel`` entry point, kept with the plugin's keys and defaults for callers of LAVIS's API
        (the plugin's own ``from_config`` read the keys at their top and call :meth:`load_starting_checkpoint`)."""
        return self.load_starting_checkpoint(starting_checkpoint(cfg))

    def load_from_pretrained(self, url_or_filename):
        return self.load_checkpoint(url_or_filename)

    def load_checkpoint(self, url_or_filename, require_complete=False):
        """Load weights; ``require_complete`` (``finetuned`` checkpoints, evaluation) makes any missing
        trainable tensor an error instead of a warning. A tensor of the checkpoint that the model has no
        place for (after ``adapt_state_dict``) is always an error: it would be trained work thrown away."""
        if is_url(url_or_filename):
            from lavis.common.dist_utils import download_cached_file

            url_or_filename = download_cached_file(url_or_filename, check_hash=False, progress=True)
        checkpoint = read_checkpoint(url_or_filename, what="model checkpoint")
        if require_complete:
            self.check_checkpoint_arch(url_or_filename, checkpoint_arch(checkpoint))
        state_dict = dict(state_dict_of(checkpoint, url_or_filename, what="model checkpoint"))
        meta = state_dict.pop(EXTRA_STATE_KEY, None)
        self.check_checkpoint_meta(meta, url_or_filename, "finetuned" if require_complete else "pretrained")
        state_dict = self.adapt_state_dict(state_dict)
        try:
            msg = self.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # size mismatches (raised by torch even with strict=False)
            mismatches = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            if not mismatches:
                raise
            raise CheckpointError(
                f"{url_or_filename} holds tensors of other shapes than {type(self).__name__} ({len(mismatches)}, e.g. "
                f"{mismatches[0]}): it was trained with another configuration (model.bert_model, "
                "model.num_query_token, model.vit_model / vit_config / image_size, or the LLM); use the values of the "
                "run that wrote it."
            ) from None
        missing = [k for k in msg.missing_keys if not self._not_in_checkpoint(k)]
        self._refuse_dropped_tensors(url_or_filename, state_dict, msg.unexpected_keys, missing)
        if missing and require_complete:
            raise CheckpointError(
                f"{url_or_filename} lacks {len(missing)} tensors that {type(self).__name__} needs (e.g. {missing[:3]}): "
                "it is not a checkpoint of this model (e.g. a stage-1 or stage-0 checkpoint given for a stage-2 "
                "model); give the checkpoint of a stage-2 or caption fine-tuning run as model.finetuned"
            )
        if missing:
            logging.warning("%s: %d trainable tensors not in the checkpoint (they start from their initialisation): "
                            "%s", url_or_filename, len(missing), missing)
        self.apply_checkpoint_meta(meta)
        logging.info("loaded checkpoint %s (%d tensors)", url_or_filename, len(state_dict))
        return msg

    # --- refusals -----------------------------------------------------------------------------------------

    def _refuse_dropped_tensors(self, path, state_dict, unexpected, missing):
        """A CheckpointError, naming the config key to fix, if trained tensors would be dropped."""
        if not unexpected and not cross_attention_layers(missing):
            return
        name = type(self).__name__
        problems = []
        dropped_xattn = [k for k in unexpected if CROSS_ATTENTION.match(k)]
        if dropped_xattn or cross_attention_layers(missing):
            theirs = cross_attention_layers(state_dict)
            ours = cross_attention_layers(k for k, _ in self.named_parameters())
            layers = [int(m.group(1)) for k in state_dict for m in [QFORMER_LAYER.match(k)] if m]
            freq = cross_attention_freq_of(theirs, max(layers) + 1 if layers else 0)
            own = getattr(getattr(getattr(self, "Qformer", None), "config", None), "cross_attention_freq", "?")
            fix = (f"Set model.cross_attention_freq: {freq}, the value the checkpoint was trained with."
                   if freq else "Use the model.cross_attention_freq and model.bert_model it was trained with.")
            losses = [f"{len(dropped_xattn)} trained tensors would be dropped"] if dropped_xattn else []
            untrained = cross_attention_layers(missing)
            if untrained:
                losses.append(f"{len(untrained)} layer(s) would start with untrained cross-attention")
            problems.append(
                f"the checkpoint's Q-Former has cross-attention in layers {theirs} but this model (model."
                f"cross_attention_freq: {own}) builds it in layers {ours}: {' and '.join(losses)}. {fix}"
            )
        other = [k for k in unexpected if not CROSS_ATTENTION.match(k)]
        if other:
            problems.append(
                f"{len(other)} tensors have no place in {name} and would be dropped (e.g. {other[:4]}): it is a "
                "checkpoint of another model, or of a differently sized configuration (model.bert_model, "
                "model.num_query_token); give a checkpoint of this model or of its previous stage."
            )
        raise CheckpointError(f"{path} does not fit {name}: " + " Also: ".join(problems))

    def check_checkpoint_arch(self, path, arch):
        """A ``finetuned`` checkpoint must come from a run of this model (or its stock LAVIS twin)."""
        from lavis.common.registry import registry

        own = {name for name, cls in registry.mapping["model_name_mapping"].items() if cls is type(self)}
        if arch is not None and arch not in own | set(self.compatible_archs):
            raise CheckpointError(
                f"{path} was written by a '{arch}' run, so it is not a checkpoint of this model "
                f"({', '.join(sorted(own))}); give model.finetuned the checkpoint of a "
                f"{' / '.join(sorted(own | set(self.compatible_archs)))} run (stage 2 or caption fine-tuning)"
            )

    # --- hooks: records.py (StageRecordsMixin) and stages.py (stage 1 / stage 2) override them ------------

    def check_checkpoint_meta(self, meta, path, role):
        """Refuse a checkpoint whose recorded metadata does not fit this model (``role``: "pretrained",
        "finetuned" or "resume"). A model without stage records checks nothing."""

    def apply_checkpoint_meta(self, meta):
        """After loading: take over what the metadata carries (e.g. a ViT that came from no file)."""

    def adapt_state_dict(self, state_dict):
        """The checkpoint's tensors as this model names them (an earlier stage's checkpoint may differ)."""
        return state_dict
