"""What a stage-1 / stage-2 / video checkpoint records about itself, and what the next stage checks.

The models of stages 1 and 2 (and ``video_opt_pformer``) put a small record into their ``state_dict()``
(``nn.Module.get_extra_state``, key ``_extra_state``), so it travels in every checkpoint LAVIS's runner
writes and in any ``torch.save({"model": model.state_dict()})``:

- ``aligned_to``: the P-Former this model was aligned to (its LLM name and width, Q and file), or the one
  recorded in the checkpoint it started from when it has no teacher itself; None for the BLIP-2 baseline;
- ``llm``: the frozen LLM of stage 2 (name and width); None for stage 1;
- ``qformer``: num_query_token, cross_attention_freq, num_hidden_layers, hidden_size, encoder_width;
- ``vision``: the image encoder (``vit_model``, the ``vit_config.checkpoint`` it came from, whether it is
  frozen, a sha256 of its weights as built);
- ``vit_weights``: the weights of a frozen ``custom_vit`` that came from no file (a random initialisation),
  which LAVIS's runner would otherwise leave out of the checkpoint with the other frozen parameters.

Loading such a checkpoint (``model.pretrained``, ``model.finetuned``, or a resume) refuses, with the config
key to fix: a Q-Former of another shape; a stage-2 LLM other than the one its stage 1 was aligned to (or,
for a stage-2 checkpoint, trained with); a teacher for another LLM than the checkpoint's alignment; another
ViT than the one the checkpoint was trained with. A model whose ``custom_vit`` is random takes the ViT the
checkpoint carries. Stock LAVIS ignores the record (it loads with ``strict=False``). Checkpoints without a
record (LAVIS's, or older ones) load with a WARNING that these checks were skipped.
"""
import logging

from lavis.common.registry import registry

from lavis_pformer.checkpoints.loading import CheckpointMixin
from lavis_pformer.errors import CheckpointError
from lavis_pformer.paths import same_model_name

STAGE_FORMAT = "lavis_pformer/stage-checkpoint-v1"
QFORMER_FIELDS = ("num_query_token", "cross_attention_freq", "num_hidden_layers", "hidden_size", "encoder_width")


class StageRecordsMixin(CheckpointMixin):
    """``get_extra_state`` / ``set_extra_state`` and the record's checks in ``CheckpointMixin.load_checkpoint``.

    The host may set ``_llm_name`` (the configured LLM), ``LLM_KEY`` (its config key, e.g. "opt_model") and
    ``VISION_WIDTH_KEY`` (what sets the Q-Former's ``encoder_width``); the record reads its P-Former teacher
    (``pformer_teacher``, ``pformer_checkpoint``: :mod:`~lavis_pformer.models.alignment`) and where its ViT came
    from (``_vit_origin``: :mod:`~lavis_pformer.backbones`).
    """

    LLM_KEY = None
    VISION_WIDTH_KEY = "model.vit_model / model.vit_config / model.image_size"

    # --- what is recorded -----------------------------------------------------------------------------

    def registered_arch(self):
        names = [n for n, cls in registry.mapping["model_name_mapping"].items() if cls is type(self)]
        return names[0] if names else type(self).__name__

    def qformer_shape(self):
        config = self.Qformer.config
        return {"num_query_token": int(self.query_tokens.shape[1]),
                "cross_attention_freq": int(config.cross_attention_freq),
                "num_hidden_layers": int(config.num_hidden_layers), "hidden_size": int(config.hidden_size),
                "encoder_width": int(config.encoder_width)}

    def alignment_record(self):
        teacher = getattr(self, "pformer_teacher", None)
        if teacher is None:
            return getattr(self, "_inherited_alignment", None)
        return {"llm_name": teacher.llm_name, "llm_hidden_size": int(teacher.llm_hidden_size),
                "num_query_token": int(teacher.num_query_token), "pformer_checkpoint": str(self.pformer_checkpoint)}

    def llm_record(self):
        name = getattr(self, "_llm_name", None)
        llm = getattr(self, self.LLM_KEY, None) if self.LLM_KEY else None
        if name is None or llm is None:
            return None
        return {"name": name, "hidden_size": int(llm.config.hidden_size)}

    def vision_record(self):
        origin = getattr(self, "_vit_origin", None)
        if origin is None or not hasattr(self, "visual_encoder"):
            return None
        frozen = not any(p.requires_grad for p in self.visual_encoder.parameters())
        return {"vit_model": origin["vit_model"], "checkpoint": origin.get("checkpoint"), "frozen": frozen,
                "fingerprint": origin.get("fingerprint") if frozen else None}

    def _carries_vit(self, vision):
        return bool(vision and vision["vit_model"] == "custom_vit" and vision["frozen"] and not vision["checkpoint"])

    def get_extra_state(self):
        vision = self.vision_record()
        carried = None
        if self._carries_vit(vision):
            carried = {k: v.detach() for k, v in self.visual_encoder.state_dict().items()}
        return {"format": STAGE_FORMAT, "arch": self.registered_arch(), "aligned_to": self.alignment_record(),
                "llm": self.llm_record(), "qformer": self.qformer_shape(), "vision": vision, "vit_weights": carried}

    def set_extra_state(self, state):
        """Called by ``load_state_dict`` (LAVIS's resume and best-checkpoint reload)."""
        self.check_checkpoint_meta(state, "the checkpoint", "resume")
        self.apply_checkpoint_meta(state)

    # --- what is checked --------------------------------------------------------------------------------

    def check_checkpoint_meta(self, meta, path, role):
        if meta is None:
            logging.warning(
                "%s carries no lavis_pformer record (a stock LAVIS or older checkpoint): what it was aligned to, "
                "its Q-Former shape and its ViT are not checked against %s", path, type(self).__name__)
            return
        if not isinstance(meta, dict) or meta.get("format") != STAGE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{path}: unknown checkpoint record (format {found!r}, expected {STAGE_FORMAT!r}); "
                                  "it was written by another version of lavis_pformer")
        where = f"{path} (a {meta.get('arch')} checkpoint)"
        problems = self._qformer_problems(meta.get("qformer") or {})
        problems += self._llm_problems(meta)
        problems += self._vision_problems(meta.get("vision"), meta.get("vit_weights") is not None)
        if problems:
            raise CheckpointError(f"{where} does not fit this {self.registered_arch()} model:\n  - "
                                  + "\n  - ".join(problems))

    def _qformer_problems(self, theirs):
        ours = self.qformer_shape()
        fixes = {"num_query_token": "set model.num_query_token: {}",
                 "cross_attention_freq": "set model.cross_attention_freq: {}",
                 "num_hidden_layers": "use the model.bert_model it was trained with ({} layers)",
                 "hidden_size": "use the model.bert_model it was trained with (width {})",
                 "encoder_width": "its Q-Former reads features of width {}: set " + self.VISION_WIDTH_KEY
                                  + " as it was"}
        return [f"Q-Former {field}: the checkpoint has {theirs[field]}, this model {ours[field]}; "
                + fixes[field].format(theirs[field])
                for field in QFORMER_FIELDS if field in theirs and theirs[field] != ours[field]]

    def _llm_problems(self, meta):
        problems = []
        aligned, trained_with = meta.get("aligned_to"), meta.get("llm")
        ours = self.llm_record()
        key = f"model.{self.LLM_KEY}" if self.LLM_KEY else "the LLM"
        if ours is not None and trained_with is not None and not _same_llm(trained_with["name"],
                                                                        trained_with["hidden_size"], ours):
            problems.append(
                f"it was trained with the LLM {trained_with['name']!r} (width {trained_with['hidden_size']}), "
                f"this model has {ours['name']!r} (width {ours['hidden_size']}): its prompt would feed another "
                f"LLM; set {key}: {trained_with['name']}")
        if ours is not None and aligned is not None and not _same_llm(aligned["llm_name"],
                                                                   aligned["llm_hidden_size"], ours):
            problems.append(
                f"it was aligned to a P-Former of the LLM {aligned['llm_name']!r} (width "
                f"{aligned['llm_hidden_size']}, Q={aligned['num_query_token']}, {aligned.get('pformer_checkpoint')}), "
                f"this model's LLM is {ours['name']!r} (width {ours['hidden_size']}): its Q-Former learnt another "
                f"LLM's prompt space. Start from a checkpoint aligned to a P-Former of {ours['name']!r}, or set "
                f"{key}: {aligned['llm_name']}")
        teacher = getattr(self, "pformer_teacher", None)
        if teacher is not None and aligned is not None and ours is None and not _same_llm(
                aligned["llm_name"], aligned["llm_hidden_size"],
                {"name": teacher.llm_name, "hidden_size": teacher.llm_hidden_size}):
            problems.append(
                f"it was aligned to a P-Former of the LLM {aligned['llm_name']!r}, model.pformer_checkpoint "
                f"({self.pformer_checkpoint}) is one of {teacher.llm_name!r}: use the P-Former it was aligned to")
        return problems

    def _vision_problems(self, theirs, carried):
        ours = self.vision_record()
        if theirs is None or ours is None:
            return []
        if theirs["vit_model"] != ours["vit_model"]:
            return [f"it was trained with model.vit_model {theirs['vit_model']}, this model has {ours['vit_model']}"]
        own_fingerprint = getattr(self, "_vit_origin", {}).get("fingerprint")
        if not theirs.get("fingerprint") or theirs["fingerprint"] == own_fingerprint:
            return []
        if carried:
            if not ours["checkpoint"]:
                return []  # this model's ViT is random too: it takes the checkpoint's (apply_checkpoint_meta)
            return [f"it was trained with a randomly initialised custom_vit, saved inside the checkpoint, but "
                    f"model.vit_config.checkpoint loads another ViT ({ours['checkpoint']}): remove "
                    "model.vit_config.checkpoint to use the checkpoint's ViT"]
        if not ours["checkpoint"]:
            return [f"it was trained with the custom_vit of {theirs['checkpoint']} but this model's custom_vit is a "
                    f"random initialisation: set model.vit_config.checkpoint: {theirs['checkpoint']}"]
        return [f"it was trained with the custom_vit of {theirs['checkpoint']}, whose weights differ from those of "
                f"model.vit_config.checkpoint ({ours['checkpoint']}): give the ViT it was trained with"]

    # --- what is taken over -------------------------------------------------------------------------------

    def apply_checkpoint_meta(self, meta):
        if not isinstance(meta, dict):
            return
        self._inherited_alignment = meta.get("aligned_to")
        carried = meta.get("vit_weights")
        ours = self.vision_record()
        if carried is not None and ours is not None and ours["vit_model"] == "custom_vit" and not ours["checkpoint"]:
            self.visual_encoder.load_state_dict(carried, strict=True)
            self._vit_origin["fingerprint"] = (meta.get("vision") or {}).get("fingerprint")
            logging.info("custom_vit: the randomly initialised ViT saved in the checkpoint replaces this model's")


def _same_llm(name, width, ours):
    return int(width) == int(ours["hidden_size"]) and same_model_name(name, ours["name"])
