"""Text-only sentence corpus for P-Former stage 0, registered as LAVIS builder ``sentence_corpus``.

Sentences come from local files only (nothing is ever downloaded). Each split's
``build_info.annotations.<split>.storage`` is a path or a list of paths; relative paths are
resolved against the current working directory, and several files are concatenated in order.
Formats:

- ``.txt``: one sentence per line.
- ``.jsonl`` / ``.ndjson``: one JSON object per line with a ``caption`` (or ``text``) string.
- ``.json``: a JSON list of such objects (if the content starts with ``{`` it is read as JSON lines).
- other extensions: sniffed from the first non-blank character (``[`` list, ``{`` JSON lines, else text).

JSON-lines records may also carry ``question`` and ``answer`` (the demo's text-only QA triples); they are
passed through (the question cleaned like LAVIS's ``blip_question``) for stage 0's optional QA term.

Blank or whitespace-only sentences are skipped and counted in the log. A missing file raises
FileNotFoundError; an empty, undecodable or malformed file raises ValueError naming the file.
Bad records (a JSON line that does not parse or has no ``caption``/``text`` string, a JSON-list
entry of that kind, a line that is not UTF-8) are errors unless ``build_info.max_bad_lines``
(per file, default 0) allows that many to be skipped.

Memory, per rank (every rank indexes its own copy):

- ``.txt`` / ``.jsonl``: one int64 byte offset per kept sentence, i.e. 8 bytes per sentence
  (12M sentences: ~96 MB); the text is read lazily from disk in ``__getitem__``.
- ``.json`` list: the whole file is parsed once while building (transient peak), then kept as one
  uint8 buffer of the UTF-8 sentences plus int64 offsets: (UTF-8 length + 8) bytes per sentence.

No per-sentence Python objects are kept, so forked DataLoader workers share these arrays
copy-on-write without the refcount-driven page copying a list of dicts causes; with the spawn
start method each worker receives a pickled copy. File handles are opened lazily per process and
are never pickled.
"""

import json
import logging
import os
from array import array

import numpy as np
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipQuestionProcessor
from omegaconf import OmegaConf

from lavis_pformer.datasets.local_builder import LocalDatasetBuilder
from lavis_pformer.errors import ConfigError, DataError, MissingFileError
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
# Optional fields of JSON-lines records, passed through for stage 0's text-only QA term.
QA_FIELDS = ("question", "answer")
_QUESTION_PROCESSOR = BlipQuestionProcessor()
_RECORD_HINT = 'expected a JSON object with a "caption" or "text" string'


class _BadRecord(ValueError):
    """A single line or list entry that cannot be turned into a sentence."""


def _record_text(obj):
    """Return the sentence of a JSON record, or raise _BadRecord."""
    if not isinstance(obj, dict):
        raise _BadRecord(f"{_RECORD_HINT}, got {type(obj).__name__}")
    key = "caption" if "caption" in obj else "text"
    value = obj.get(key)
    if not isinstance(value, str):
        raise _BadRecord(f"{_RECORD_HINT}, got keys {sorted(obj)[:5]}")
    return value


def _parse_text_line(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRecord(f"not UTF-8 ({e.reason})") from None


def _parse_json_line(raw):
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRecord(f"invalid JSON ({e})") from None
    return _record_text(obj)


_LINE_PARSERS = {"txt": _parse_text_line, "jsonl": _parse_json_line}


def _detect_format(path):
    """Return "txt", "jsonl" or "json" from the extension, else from the first non-blank byte."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        return "txt"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    first = b""
    with open(path, "rb") as f:
        chunk = f.read(1 << 16)
        if chunk.startswith(_BOM):
            chunk = chunk[len(_BOM):]
        while chunk and not first:
            first = chunk.lstrip()[:1]
            chunk = f.read(1 << 16)
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    if ext == ".json" and first:
        raise DataError(
            f"{path}: a .json sentence file must be a JSON list of objects or JSON lines, "
            f"but it starts with {first!r}. Fix the file or rename it to .txt if it is plain text."
        )
    return "txt"


class _Tally:
    """Counts skipped blank and bad records of one file and enforces the bad-record tolerance."""

    def __init__(self, path, max_bad_lines):
        self.path, self.max_bad_lines = path, max_bad_lines
        self.blank = self.bad = 0

    def bad_record(self, where, err):
        self.bad += 1
        if self.bad > self.max_bad_lines:
            raise DataError(
                f"{self.path}, {where}: {err}. Fix or remove the record, or raise "
                f"build_info.max_bad_lines (now {self.max_bad_lines}) to skip bad records."
            )

    def finish(self, kept):
        if self.blank:
            logger.warning("skipped %d blank lines in %s", self.blank, self.path)
        if self.bad:
            logger.warning(
                "skipped %d bad lines in %s (max_bad_lines=%d)",
                self.bad, self.path, self.max_bad_lines,
            )
        if kept == 0:
            raise DataError(
                f"{self.path} contains no sentences ({self.blank} blank, {self.bad} bad records "
                "skipped). Fill the file or remove it from build_info.annotations.<split>.storage."
            )


class _LineSource:
    """Sentences of a .txt / .jsonl file: byte offsets of kept lines, text read lazily."""

    def __init__(self, path, fmt, max_bad_lines):
        self.path, self.fmt = path, fmt
        parse = _LINE_PARSERS[fmt]
        tally = _Tally(path, max_bad_lines)
        offsets = array("q")
        pos = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, pos = pos, pos + len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    start, raw = start + len(_BOM), raw[len(_BOM):]
                if not raw.strip():
                    tally.blank += 1
                    continue
                try:
                    text = parse(raw)
                except _BadRecord as e:
                    tally.bad_record(f"line {lineno}", e)
                    continue
                if text.strip():
                    offsets.append(start)
                else:
                    tally.blank += 1
        tally.finish(len(offsets))
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self._fh, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, None
        return state

    def __getitem__(self, i):
        return _LINE_PARSERS[self.fmt](self._read_line(i)).strip()

    def extras(self, i):
        """QA fields of a JSON-lines record ({"question", "answer"} if present), else {}."""
        if self.fmt != "jsonl":
            return {}
        record = json.loads(self._read_line(i))
        return {k: str(record[k]).strip() for k in QA_FIELDS if k in record}

    def _read_line(self, i):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return self._fh.readline()


class _BufferSource:
    """Sentences of a JSON list file: one UTF-8 uint8 buffer plus int64 start offsets."""

    def __init__(self, path, max_bad_lines):
        self.path = path
        try:
            with open(path, "r", encoding="utf-8-sig") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{path} is not valid JSON ({e}). Fix the file, or use one JSON object per "
                "line with a .jsonl extension."
            ) from None
        if not isinstance(records, list):
            raise DataError(
                f"{path}: expected a JSON list of objects with a \"caption\" or \"text\" string, "
                f"got a JSON {type(records).__name__}."
            )
        tally = _Tally(path, max_bad_lines)
        encoded = []
        for i, obj in enumerate(records):
            try:
                text = _record_text(obj).strip()
            except _BadRecord as e:
                tally.bad_record(f"entry {i}", e)
                continue
            if text:
                encoded.append(text.encode("utf-8"))
            else:
                tally.blank += 1
        del records
        tally.finish(len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


class SentenceCorpusDataset(Dataset):
    """Map-style dataset of sentences from local files; items are
    ``{"text_input": processed sentence, "instance_id": str(index)}``."""

    def __init__(self, text_processor, paths, max_bad_lines=0):
        if not paths:
            raise ValueError("SentenceCorpusDataset needs at least one sentence file.")
        self.text_processor = text_processor
        self.paths = list(paths)
        self.sources = [self._open_source(p, max_bad_lines) for p in self.paths]
        self._starts = np.cumsum([0] + [len(s) for s in self.sources], dtype=np.int64)

    @staticmethod
    def _open_source(path, max_bad_lines):
        if not os.path.exists(path):
            raise MissingFileError(
                f"sentence file {path} does not exist (cwd {os.getcwd()}). Fix "
                "build_info.annotations.<split>.storage: relative paths are resolved against "
                "the current working directory."
            )
        if not os.path.isfile(path):
            raise DataError(f"{path} is not a file; list the sentence files themselves in storage.")
        fmt = _detect_format(path)
        if fmt == "json":
            return _BufferSource(path, max_bad_lines)
        return _LineSource(path, fmt, max_bad_lines)

    def __len__(self):
        return int(self._starts[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sentences")
        src = int(np.searchsorted(self._starts, index, side="right")) - 1
        source, local = self.sources[src], index - int(self._starts[src])
        text = source[local]
        if self.text_processor is not None:
            text = self.text_processor(text)
        item = {"text_input": text, "instance_id": str(index)}
        extras = source.extras(local) if hasattr(source, "extras") else {}
        if "question" in extras:  # cleaned as LAVIS's VQA evaluation cleans questions
            extras["question"] = _QUESTION_PROCESSOR(extras["question"])
        item.update(extras)
        return item

    def collater(self, samples):
        batch = {key: [s[key] for s in samples] for key in ("text_input", "instance_id")}
        for key in QA_FIELDS:
            if all(key in s for s in samples):
                batch[key] = [s[key] for s in samples]
        return batch


@registry.register_builder("sentence_corpus")
class SentenceCorpusBuilder(LocalDatasetBuilder):
    """Builds train/val/test SentenceCorpusDatasets from local files; a given config is merged
    over the default yaml, so only ``build_info.annotations`` is required."""

    NAME = "sentence_corpus"

    def build(self):
        self.build_processors()
        build_info = self.config.build_info
        max_bad_lines = build_info.get("max_bad_lines", 0)
        if isinstance(max_bad_lines, bool) or not isinstance(max_bad_lines, int) or max_bad_lines < 0:
            raise ConfigError(
                f"datasets.sentence_corpus.build_info.max_bad_lines must be an integer >= 0, got {max_bad_lines!r}."
            )
        datasets = {}
        for split, info in build_info.annotations.items():
            if split not in ("train", "val", "test"):
                logger.warning("sentence_corpus: ignoring unknown split %r", split)
                continue
            processor = self.text_processors["train" if split == "train" else "eval"]
            datasets[split] = SentenceCorpusDataset(
                processor, self._split_paths(split, info), max_bad_lines
            )
            logger.info(
                "sentence_corpus %s: %d sentences from %d file(s)",
                split, len(datasets[split]), len(datasets[split].paths),
            )
        return datasets

    @staticmethod
    def _split_paths(split, info):
        key = f"datasets.sentence_corpus.build_info.annotations.{split}.storage"
        storage = None if OmegaConf.is_missing(info, "storage") else info.get("storage")
        if isinstance(storage, str):
            storage = [storage]
        if not storage:
            raise ConfigError(f"set {key} to a local sentence file or a list of files.")
        return [os.path.abspath(os.path.expanduser(str(p))) for p in storage]
