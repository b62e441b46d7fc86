"""From one stage's checkpoint to the next model: what is renamed, recreated or dropped (``adapt_state_dict``).

- Stage 1 (``blip2_qformer_pformer``): a model built without ``llm_proj`` (no teacher and no ``llm_hidden_size``)
  recreates it, at the checkpoint's width, for a checkpoint that has one.
- Stage 2 (``blip2_opt_pformer``, ``blip2_t5_pformer``): a stage-1 checkpoint's ``llm_proj`` becomes
  ``opt_proj`` / ``t5_proj`` (it must have the LLM's width), and the tensors stage 2 has no place for, which
  LAVIS drops with ``strict=False``, are dropped: the ITC / ITM / ITG heads, the Q-Former's text embeddings and the
  text-side feed-forward of every layer. Anything else the checkpoint holds must fit the model
  (``CheckpointMixin.load_checkpoint`` refuses the rest).
"""
import logging
import re

import torch.nn as nn

from lavis_pformer.checkpoints.records import StageRecordsMixin
from lavis_pformer.errors import CheckpointError

STAGE1_ONLY_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "Qformer.cls.",
                        "Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.")
STAGE1_ONLY_KEYS = ("temp",)
_TEXT_FFN = re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(output|intermediate)\.")


def is_stage1_only(key):
    return key.startswith(STAGE1_ONLY_PREFIXES) or key in STAGE1_ONLY_KEYS or bool(_TEXT_FFN.match(key))


class Stage1CheckpointMixin(StageRecordsMixin):
    """Stage 1: ``llm_proj`` restored even if this model was built without one (the host has ``llm_proj``, None
    when it was built without, and ``query_tokens``)."""

    def adapt_state_dict(self, state_dict):
        """A checkpoint with ``llm_proj`` restores it even if this model was built without one."""
        weight = state_dict.get("llm_proj.weight")
        if self.llm_proj is None and weight is not None:
            self.llm_proj = nn.Linear(weight.shape[1], weight.shape[0]).to(self.query_tokens.device)
            logging.info("created llm_proj (width %d) for the checkpoint's weights", weight.shape[0])
        return state_dict


class Stage2CheckpointMixin(StageRecordsMixin):
    """Stage 2: a stage-1 checkpoint's ``llm_proj`` becomes the host's ``PROJ`` ("opt_proj" / "t5_proj") and its
    stage-1-only tensors are dropped."""

    def adapt_state_dict(self, state_dict):
        """A stage-1 checkpoint: ``llm_proj.*`` becomes ``<llm>_proj.*`` and its stage-1-only tensors are
        dropped; anything else it holds must fit this model (``load_checkpoint`` refuses the rest)."""
        if f"{self.PROJ}.weight" in state_dict:
            return state_dict  # a stage-2 checkpoint
        proj = getattr(self, self.PROJ)
        if "llm_proj.weight" in state_dict:
            width = state_dict["llm_proj.weight"].shape[0]
            if width != proj.out_features:
                raise CheckpointError(
                    f"the stage-1 checkpoint's llm_proj has width {width} but this model's LLM needs "
                    f"{proj.out_features}: stage 1 was trained with a P-Former for another LLM"
                )
        own = set(self.state_dict())
        adapted, dropped = {}, []
        for key, value in state_dict.items():
            if key.startswith("llm_proj."):
                adapted[self.PROJ + key[len("llm_proj"):]] = value
            elif key not in own and is_stage1_only(key):
                dropped.append(key)
            else:
                adapted[key] = value
        if dropped:
            logging.info("stage-1 checkpoint: %s; %d stage-1-only tensors (ITC/ITM/ITG heads, text embeddings and "
                         "text feed-forward layers) dropped, as LAVIS does",
                         f"llm_proj -> {self.PROJ}" if "llm_proj.weight" in state_dict else "no llm_proj",
                         len(dropped))
        return adapted
