"""The P-Former: a BERT sentence encoder that maps a caption to Q soft-prompt vectors of a frozen LLM.

Shared by stage 0 (trained), stages 1/2 and video (frozen teacher). Checkpoints are written and read
only through `PFormer.save` / `PFormer.load`, which record and verify Q, the LLM width and the LLM name.
"""
import json
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lavis_pformer.errors import CheckpointError
from lavis_pformer.paths import same_model_name

CHECKPOINT_FORMAT = "lavis_pformer/pformer-v1"
TEMP_MIN, TEMP_MAX = 0.001, 0.5

_HOW_TO_GET_ONE = (
    "set model.pformer_checkpoint to the pformer.pth written by stage 0, or convert the authors' "
    "weights with `python -m lavis_pformer.convert_reference`"
)
_META_KEYS = ("num_query_token", "llm_name", "llm_hidden_size", "embed_dim", "bert_model", "bert_config")


class PFormerCheckpointError(CheckpointError):
    """A P-Former checkpoint is missing, unreadable or does not match what the model expects."""


class PFormerOutput(NamedTuple):
    prompt: Tensor  # [B, Q, H_llm]
    text_feat: Tensor  # [B, embed_dim], L2-normalised


class PFormer(nn.Module):
    """BERT encoder + prompt head + contrastive head.  prompt: [B, Q, H_llm]; text_feat: [B, embed_dim] (L2-normalised)."""

    def __init__(self, bert_config: transformers.BertConfig, num_query_token: int, llm_hidden_size: int,
                 llm_name: str, embed_dim: int = 256, bert_model: str = ""):
        super().__init__()
        for name, value in (("num_query_token", num_query_token), ("llm_hidden_size", llm_hidden_size),
                            ("embed_dim", embed_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PFormer: {name} must be a positive int, got {value!r}")
        if not isinstance(llm_name, str) or not llm_name:
            raise ValueError(f"PFormer: llm_name must be a non-empty string, got {llm_name!r}")
        hidden = bert_config.hidden_size
        self.bert_config = bert_config
        self.num_query_token = num_query_token
        self.llm_hidden_size = llm_hidden_size
        self.llm_name = llm_name
        self.bert_model = bert_model
        self.encoder = transformers.BertModel(bert_config, add_pooling_layer=False)
        self.query_proj = nn.Linear(hidden, num_query_token * hidden)
        self.prompt_head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.llm_proj = nn.Linear(hidden, llm_hidden_size)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))

    @classmethod
    def from_bert(cls, bert_model: str, num_query_token: int, llm_hidden_size: int, llm_name: str,
                  embed_dim: int = 256) -> "PFormer":
        """New P-Former whose encoder holds the pretrained weights of `bert_model` (hub name or local dir); heads random."""
        encoder = transformers.BertModel.from_pretrained(bert_model, add_pooling_layer=False)
        model = cls(encoder.config, num_query_token, llm_hidden_size, llm_name, embed_dim, bert_model)
        model.encoder.load_state_dict(encoder.state_dict())
        return model

    def temperature(self) -> Tensor:
        """Contrastive temperature clamped to [0.001, 0.5] (scalar)."""
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] tokens -> [CLS] hidden state [B, H]."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state[:, 0]

    def prompt_from_cls(self, cls: Tensor) -> Tensor:
        """[B, H] -> soft prompt [B, Q, H_llm]."""
        queries = self.query_proj(cls).view(cls.size(0), self.num_query_token, -1)
        return self.llm_proj(self.prompt_head(queries))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> PFormerOutput:
        """[B, L] tokens -> prompt [B, Q, H_llm], text_feat [B, embed_dim] (normalised)."""
        cls = self.encode(input_ids, attention_mask)
        return PFormerOutput(self.prompt_from_cls(cls), F.normalize(self.text_proj(cls), dim=-1))

    @property
    def metadata(self) -> dict:
        return dict(
            num_query_token=self.num_query_token,
            llm_name=self.llm_name,
            llm_hidden_size=self.llm_hidden_size,
            embed_dim=self.text_proj.out_features,
            bert_model=self.bert_model,
            bert_config=json.loads(self.bert_config.to_json_string(use_diff=False)),
        )

    def save(self, path: str) -> None:
        """Atomically write {"format", "meta", "state_dict"} to `path`, floating tensors in fp32 (whatever the
        module's dtype: a teacher cast to fp16 / bf16 never writes a half-precision P-Former)."""
        path = os.fspath(path)
        state_dict = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                      for k, v in self.state_dict().items()}
        tmp = path + ".tmp"
        try:
            torch.save({"format": CHECKPOINT_FORMAT, "meta": self.metadata, "state_dict": state_dict}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, *, num_query_token: Optional[int] = None, llm_hidden_size: Optional[int] = None,
             llm_name: Optional[str] = None) -> "PFormer":
        """Strictly load a checkpoint written by `save`; the keyword values, when given, must match it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise PFormerCheckpointError(f"P-Former checkpoint {path!r} {what}: {_HOW_TO_GET_ONE}.")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PFormerCheckpointError(
                f"P-Former checkpoint {path!r} cannot be read (truncated, corrupt or not a tensors-only torch "
                f"file): {type(e).__name__}: {e}. Re-create it: {_HOW_TO_GET_ONE}.") from e
        _check_format(path, ckpt)
        meta = ckpt["meta"]
        _check_expected(path, meta, num_query_token=num_query_token, llm_hidden_size=llm_hidden_size,
                        llm_name=llm_name)
        try:
            bert_config = transformers.BertConfig.from_dict(meta["bert_config"])
            model = cls(bert_config, meta["num_query_token"], meta["llm_hidden_size"], meta["llm_name"],
                        meta["embed_dim"], meta["bert_model"])
        except (TypeError, ValueError, KeyError) as e:
            raise PFormerCheckpointError(
                f"P-Former checkpoint {path!r} has invalid metadata ({e}); re-create it: {_HOW_TO_GET_ONE}.") from e
        problems = state_dict_problems(model.state_dict(), ckpt["state_dict"])
        if problems:
            raise PFormerCheckpointError(
                f"P-Former checkpoint {path!r} does not match the P-Former its metadata describes:\n  "
                + "\n  ".join(problems)
                + f"\nThe file is damaged or was not written by PFormer.save; re-create it: {_HOW_TO_GET_ONE}.")
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return model


def save_untrained_pformer(path: str, bert_model: str, num_query_token: int, llm_hidden_size: int, llm_name: str,
                           embed_dim: int = 256, seed: int = 0, bert_weights: bool = True) -> str:
    """Write an untrained P-Former (new query tokens and heads) as stage 0 writes one, and return its path: a
    stand-in teacher for stages 1 and 2 where the teacher's quality does not matter (tests, benchmarks). The
    encoder holds ``bert_model``'s weights, or with ``bert_weights=False`` a random initialisation of its config
    (for a folder that holds a config only)."""
    torch.manual_seed(seed)
    if bert_weights:
        model = PFormer.from_bert(bert_model, num_query_token, llm_hidden_size, llm_name, embed_dim=embed_dim)
    else:
        model = PFormer(transformers.BertConfig.from_pretrained(bert_model), num_query_token, llm_hidden_size,
                        llm_name, embed_dim=embed_dim, bert_model=bert_model)
    model.save(str(path))
    return str(path)


def state_dict_problems(expected: dict, given: dict) -> list:
    """Lines describing missing, unexpected and wrongly shaped tensors of `given` w.r.t. `expected`."""
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(given)):
        if not isinstance(given[key], Tensor):
            problems.append(f"{key}: not a tensor ({type(given[key]).__name__})")
        elif given[key].shape != expected[key].shape:
            problems.append(f"wrong shape for {key}: {tuple(given[key].shape)} in the file, "
                            f"{tuple(expected[key].shape)} expected")
    return problems


def _check_format(path: str, ckpt) -> None:
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        meta = ckpt.get("meta")
        missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
        if not isinstance(ckpt.get("state_dict"), dict) or missing:
            raise PFormerCheckpointError(
                f"P-Former checkpoint {path!r} is incomplete (state_dict present: "
                f"{isinstance(ckpt.get('state_dict'), dict)}, missing metadata: {missing}); "
                f"re-create it: {_HOW_TO_GET_ONE}.")
        return
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        model_keys = list(ckpt["model"])
        if any(k.startswith(("Pformer.", "Darkformer.")) for k in model_keys):
            raise PFormerCheckpointError(
                f"{path!r} is a reference (authors') checkpoint, not a lavis_pformer P-Former checkpoint: "
                f"convert it with `python -m lavis_pformer.convert_reference --src {path} --out pformer.pth ...` "
                f"and set model.pformer_checkpoint to the output.")
        raise PFormerCheckpointError(
            f"{path!r} is a LAVIS training checkpoint (top-level keys: {sorted(ckpt)}), not a P-Former "
            f"checkpoint: use the pformer.pth that stage 0 writes next to it in the same output directory.")
    found = f"format {ckpt.get('format')!r}, keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) \
        else f"a {type(ckpt).__name__}"
    raise PFormerCheckpointError(
        f"{path!r} is not a P-Former checkpoint (expected format {CHECKPOINT_FORMAT!r}, found {found}): "
        f"{_HOW_TO_GET_ONE}.")


def _check_expected(path: str, meta: dict, **expected) -> None:
    problems = []
    for key, want in expected.items():
        same = same_model_name(meta[key], want) if key == "llm_name" else meta[key] == want
        if want is not None and not same:
            problems.append(f"{key}: the checkpoint has {meta[key]!r}, the model expects {want!r}")
    if problems:
        raise PFormerCheckpointError(
            f"P-Former checkpoint {path!r} (trained against LLM {meta['llm_name']!r} with "
            f"num_query_token={meta['num_query_token']}, llm_hidden_size={meta['llm_hidden_size']}) does not fit "
            f"this model:\n  " + "\n  ".join(problems)
            + "\nTrain a P-Former for this LLM and query count (stage 0) or convert the authors' weights for it "
              "(`python -m lavis_pformer.convert_reference`), or change the model config to match.")
