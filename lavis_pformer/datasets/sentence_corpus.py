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

Each file is parsed once (msgspec, :mod:`~lavis_pformer.datasets.json_batches`) into a cache file of Arrow
columns (:mod:`~lavis_pformer.datasets.arrow_cache`, ``build_info.cache_dir``): the stripped UTF-8 sentences with
one int32 offset each, and for JSON lines the question and answer. Every later start (the other ranks, resumes)
maps that file instead of parsing again. Why: a line-by-line index of 12M lines (the offsets this corpus kept
before, in every rank at every start) took 5.9 s as text and 59 s as JSON lines; the first start with the cache
takes 10.2 s and 36.6 s (it writes the cache file), every later one under 0.01 s
(``bench/bench_sentence_corpus_start.py``). The mapped pages are shared by all the processes of a machine (one
copy, not one per rank), hold no Python object per sentence, and a spawned DataLoader worker maps the file again
from its path. A cache file built under a larger ``max_bad_lines`` than the present one is rebuilt (so the error
names the bad record).
"""

import json
import logging
import os
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipQuestionProcessor
from omegaconf import OmegaConf

from lavis_pformer.datasets.arrow_cache import ArrowCache, StringSpool, cache_folder, string_views, text_at
from lavis_pformer.datasets.files import invalid_json
from lavis_pformer.datasets.json_batches import (JSONListError, decode_each, json_list_batches, line_batches,
                                                 line_chunks)
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


class _Sentence(msgspec.Struct, gc=False):
    """The fields of a JSON sentence record (absent ones are UNSET)."""

    caption: Any = msgspec.UNSET
    text: Any = msgspec.UNSET
    question: Any = msgspec.UNSET
    answer: Any = msgspec.UNSET


_decode_sentence = msgspec.json.Decoder(_Sentence).decode


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
        if kept == 0:
            raise DataError(
                f"{self.path} contains no sentences ({self.blank} blank, {self.bad} bad records "
                "skipped). Fill the file or remove it from build_info.annotations.<split>.storage."
            )


def _report_skipped(path, metadata, max_bad_lines):
    """Log the blank and bad records that the parse of ``path`` skipped (at every start, parsed or mapped)."""
    if metadata["blank"]:
        logger.warning("skipped %d blank lines in %s", metadata["blank"], path)
    if metadata["bad"]:
        logger.warning("skipped %d bad lines in %s (max_bad_lines=%d)", metadata["bad"], path, max_bad_lines)


class _Columns:
    """The kept sentences of one file (stripped) and, for JSON lines, their question and answer (None if absent),
    spooled into Arrow columns."""

    def __init__(self, spool, qa):
        self.text = StringSpool(spool, "text")
        self.qa = {k: StringSpool(spool, k) for k in QA_FIELDS} if qa else {}

    def add(self, texts, records=None):
        """``texts``: stripped, non-blank; ``records``: their decoded records (for the QA fields)."""
        self.text.append(texts)
        for key, column in self.qa.items():
            column.append([None if getattr(r, key) is msgspec.UNSET else str(getattr(r, key)).strip()
                           for r in records])

    def finish(self):
        columns = {"text": self.text.finish()}
        columns.update((key, column.finish()) for key, column in self.qa.items() if column.nulls < column.rows)
        return columns


def _add_text_lines(path, tally, columns):
    """Add the lines of a text file to ``columns``, stripped (Arrow's whitespace trim strips what ``str.strip``
    does), blank ones counted; a chunk that is not UTF-8 is read line by line to name (and count) its bad lines."""
    for first, chunk in line_chunks(path):
        newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
        starts = np.concatenate([[0], newlines + 1, [len(chunk)]]).astype(np.int64)  # a line ends with its \n
        lines = pa.Array.from_buffers(pa.large_binary(), len(starts) - 1, [None, pa.py_buffer(starts),
                                                                           pa.py_buffer(chunk)])
        try:
            texts = pc.utf8_trim_whitespace(lines.cast(pa.large_string()))
        except pa.ArrowInvalid:  # not UTF-8
            texts = []
            for number, raw in enumerate(chunk.split(b"\n"), first):
                try:
                    texts.append(raw.decode("utf-8").strip())
                except UnicodeDecodeError as e:
                    tally.bad_record(f"line {number}", f"not UTF-8 ({e.reason})")
            texts = pa.array(texts, pa.large_string())
        kept = pc.filter(texts, pc.greater(pc.binary_length(texts), 0))
        tally.blank += len(texts) - len(kept)
        columns.add(kept)


def _json_batches(path, fmt, tally):
    """The records of a JSON-lines file or JSON list: (where of each record, raw records) batch by batch."""
    if fmt == "jsonl":
        for first, lines in line_batches(path):
            items = [(f"line {n}", raw) for n, raw in enumerate(lines, first) if raw.strip()]
            tally.blank += len(lines) - len(items)
            yield items
        return
    try:
        for index, items, _ in json_list_batches(path):
            yield [(f"entry {index + j}", raw) for j, raw in enumerate(items)]
    except JSONListError as e:
        raise invalid_json("sentence file", path, e) from None


def _add_json_records(items, tally, columns):
    records, ok = decode_each(_decode_sentence, [raw for _, raw in items])
    texts = [r.caption if r.caption is not msgspec.UNSET else r.text for r in records] if ok else []
    if not ok or not all(type(t) is str for t in texts):  # name the bad records, as _record_text words them
        kept = []
        for (where, raw), record in zip(items, records):
            try:
                if isinstance(record, msgspec.MsgspecError):
                    raise _BadRecord(f"invalid JSON ({record})")
                _record_text(msgspec.json.decode(raw))
                kept.append(record)
            except (_BadRecord, msgspec.MsgspecError) as e:
                tally.bad_record(where, e)
        records = kept
        texts = [r.caption if r.caption is not msgspec.UNSET else r.text for r in records]
    texts = [t.strip() for t in texts]
    keep = [i for i, t in enumerate(texts) if t]
    tally.blank += len(texts) - len(keep)
    columns.add([texts[i] for i in keep], [records[i] for i in keep])


def _parse(path, fmt, max_bad_lines, spool):
    """A sentence file's cache columns and metadata (skipped blank and bad records)."""
    tally = _Tally(path, max_bad_lines)
    columns = _Columns(spool, qa=fmt == "jsonl")
    if fmt == "txt":
        _add_text_lines(path, tally, columns)
    else:
        for items in _json_batches(path, fmt, tally):
            _add_json_records(items, tally, columns)
    tally.finish(columns.text.rows)
    return columns.finish(), {"blank": tally.blank, "bad": tally.bad}


class _CachedSentences:
    """One sentence file's columns, mapped from its cache file; ``[i]`` -> sentence, ``extras(i)`` -> QA fields."""

    def __init__(self, table):
        self.table = table
        self._views()

    def _views(self):
        self.text_buffer, self.text_offsets = string_views(self.table.columns["text"])
        self.qa = {k: self.table.columns[k] for k in QA_FIELDS if k in self.table.columns}

    def __getstate__(self):
        return {"table": self.table}  # the table pickles as its cache file's path

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def __len__(self):
        return len(self.text_offsets) - 1

    def __getitem__(self, i):
        return text_at(self.text_buffer, self.text_offsets, i)

    def extras(self, i):
        """QA fields of a JSON-lines record ({"question", "answer"} where present), else {}."""
        return {k: column[i].as_py() for k, column in self.qa.items() if column[i].is_valid}


class SentenceCorpusDataset(Dataset):
    """Map-style dataset of sentences from local files; items are
    ``{"text_input": processed sentence, "instance_id": str(index)}``."""

    def __init__(self, text_processor, paths, max_bad_lines=0, cache_dir="auto"):
        if not paths:
            raise ValueError("SentenceCorpusDataset needs at least one sentence file.")
        self.text_processor = text_processor
        self.paths = list(paths)
        cache = ArrowCache(cache_folder(cache_dir, "datasets.sentence_corpus.build_info.cache_dir"))
        self.sources = [self._open_source(p, max_bad_lines, cache) for p in self.paths]
        self._starts = np.cumsum([0] + [len(s) for s in self.sources], dtype=np.int64)

    @staticmethod
    def _open_source(path, max_bad_lines, cache):
        if not os.path.exists(path):
            raise MissingFileError(
                f"sentence file {path} does not exist (cwd {os.getcwd()}). Fix "
                "build_info.annotations.<split>.storage: relative paths are resolved against "
                "the current working directory."
            )
        if not os.path.isfile(path):
            raise DataError(f"{path} is not a file; list the sentence files themselves in storage.")
        fmt = _detect_format(path)
        table = cache.load("sentences", [path], lambda spool: _parse(path, fmt, max_bad_lines, spool),
                           f"sentences of {path}", accept=lambda metadata: metadata["bad"] <= max_bad_lines)
        _report_skipped(path, table.metadata, max_bad_lines)
        return _CachedSentences(table)

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
        extras = source.extras(local)
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
                processor, self._split_paths(split, info), max_bad_lines, build_info.get("cache_dir", "auto")
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
