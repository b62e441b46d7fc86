"""Image-caption records as a few columns instead of one Python dict per sample, parsed once and then mapped.

LAVIS's caption datasets (``BaseDataset``) keep the parsed annotation file as a list of dicts: at 4M pairs that is
hundreds of bytes of Python objects per pair, per rank. Forked DataLoader workers share those pages only until they
touch them, and merely reading a dict writes its reference count, so every worker ends up with a private copy
(LAVIS issue #247: hosts running out of memory on large caption sets). :class:`CompactCaptions` keeps three
columns of one Arrow record batch:

- the image paths and the captions: UTF-8 bytes with one offset per record each (int32 while a column is under
  2 GiB, else int64);
- the image of each record as a dense index (0, 1, ... in order of first appearance of its ``image_id``, as
  LAVIS's ``CaptionDataset.img_ids``), int32.

That is (path bytes + caption bytes + 12) bytes per record and no Python object per record. The batch lives in a
cache file (:mod:`~lavis_pformer.datasets.arrow_cache`): the first start parses the annotation files and writes it,
every later start (the other ranks, resumes, the next stage) maps it, and all the processes of a machine share its
pages. A spawned worker receives the file's path and maps it too.

Parsing: msgspec (:mod:`~lavis_pformer.datasets.json_batches`: a JSON list is split into its elements, JSON lines
are read in chunks) decodes batches of records into a ``Struct`` of the three fields, which become Arrow columns
written to disk as they come; image ids are numbered by Arrow's dictionary encoding (a hash table in C++; see
:func:`numbered_in_order`). The whole parsed file never exists in memory.
"""
import json
import os
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lavis_pformer.datasets.arrow_cache import ArrowCache, StringSpool, cache_folder, int_view, string_views, text_at
from lavis_pformer.datasets.files import check_file, invalid_json
from lavis_pformer.datasets.json_batches import JSONListError, decode_each, json_list_batches, line_batches
from lavis_pformer.errors import DataError

REQUIRED = ("image", "caption", "image_id")
KIND = "captions"  # the cache files' name prefix
WHAT = "annotation file"


class _Record(msgspec.Struct, gc=False):
    image: str
    caption: str
    image_id: Any


_decode = msgspec.json.Decoder(_Record).decode
_decode_list = msgspec.json.Decoder(list[_Record]).decode


def _is_lines(path):
    return os.path.splitext(path)[1].lower() in (".jsonl", ".ndjson")


def _decoded_batches(path):
    """(index of the first record, [raw record], ([_Record or the msgspec error of that record], no error), line_of)
    of a caption annotation file, a batch at a time: a JSON list, or JSON lines (``.jsonl`` / ``.ndjson``; blank lines
    skipped). ``line_of(j)``: the line of record ``j`` of the batch (JSON lines), else None."""
    if _is_lines(path):
        index = 0
        for first, lines in line_batches(path):
            items = [line for line in lines if line.strip()]
            yield index, items, decode_each(_decode, items), _line_of(first, lines)
            index += len(items)
        return
    try:
        for index, items, window in json_list_batches(path):
            try:
                decoded = _decode_list(window), True
            except msgspec.MsgspecError:  # find the record (and its error) one by one
                decoded = decode_each(_decode, items)
            yield index, items, decoded, None
    except JSONListError as e:
        if e.first is not None:
            raise DataError(f"{WHAT} {path}: expected a JSON list of objects with keys {list(REQUIRED)}, "
                            f"but it starts with {e.first!r}.") from None
        raise invalid_json(WHAT, path, e) from None


def _line_of(first, lines):
    """line_of(j): the number of the j-th non-blank line of ``lines``, whose first is line ``first``."""
    return lambda j: first + [k for k, line in enumerate(lines) if line.strip()][j]


def _check_record(path, index, record):
    """Raise the DataError of the first problem of a decoded record (its keys, image path, caption), if any."""
    missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise DataError(f"{WHAT} {path}, entry {index}: missing {missing} (each entry needs {list(REQUIRED)}). Fix "
                        "the entry or regenerate the file.")
    if not isinstance(record["image"], str):
        raise DataError(f"{WHAT} {path}, entry {index}: image {record['image']!r} is not a path string. Fix the "
                        "entry.")
    if not isinstance(record["caption"], str):
        raise DataError(f"{WHAT} {path}, entry {index}: caption {record['caption']!r} is not a string. Fix the "
                        "entry (a caption is text) or remove it.")


def _raise_first_error(path, index, items, records, line_of):
    j, error = next((j, r) for j, r in enumerate(records) if isinstance(r, msgspec.MsgspecError))
    if not isinstance(error, msgspec.ValidationError):  # not JSON (or not UTF-8)
        if line_of is not None:
            raise DataError(f"{WHAT} {path}, line {line_of(j)}: not valid JSON ({error}). Fix or regenerate the "
                            "file.")
        raise invalid_json(WHAT, path, f"entry {index + j}: {error}")
    _check_record(path, index + j, msgspec.json.decode(items[j]))
    raise DataError(f"{WHAT} {path}, entry {index + j}: {error}. Fix the entry or regenerate the file.")


def _tagged(value):
    """An image_id as a string that keeps its JSON type apart (7 and "7" are different ids, as in LAVIS's dict)."""
    if isinstance(value, str):
        return "s" + value
    if isinstance(value, int) and not isinstance(value, bool):
        return "i%d" % value
    return "j" + json.dumps(value, sort_keys=True)


class _ImageIds:
    """The image_id of every record, kept as Arrow chunks (int64 or string when a batch holds only those, else
    :func:`_tagged` strings), and their dense numbering in order of first appearance."""

    def __init__(self):
        self.chunks = []

    def append(self, values):
        try:
            array = pa.array(values)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            array = None
        if array is not None and array.null_count == 0 and array.type in (pa.int64(), pa.string()):
            self.chunks.append((str(array.type), array))
        else:
            self.chunks.append(("tagged", pa.array([_tagged(v) for v in values], pa.string())))

    def dense(self):
        """(int32 numpy array: the number of each record's id, the number of distinct ids)."""
        if len({kind for kind, _ in self.chunks}) <= 1:
            arrays = [array for _, array in self.chunks]
        else:  # mixed batches: every id as its tagged string
            tag = {"int64": lambda a: pc.binary_join_element_wise("i", pc.cast(a, pa.string()), ""),
                   "string": lambda a: pc.binary_join_element_wise("s", a, ""), "tagged": lambda a: a}
            arrays = [tag[kind](array) for kind, array in self.chunks]
        self.chunks = []
        if arrays and arrays[0].type == pa.string():
            arrays = [a.cast(pa.large_string()) for a in arrays]  # one array of them may pass 2 GiB
        return numbered_in_order(pa.chunked_array(arrays, arrays[0].type if arrays else pa.int64()).combine_chunks())


def numbered_in_order(array):
    """(int32 numpy array: 0, 1, ... numbering the distinct values of ``array`` in order of first appearance, the
    number of distinct values). Equal neighbours form runs and only the first value of each run is hashed (Arrow's
    dictionary encoding); when those are strictly increasing (a file in id or path order) nothing is hashed."""
    if len(array) == 0:
        return np.zeros(0, np.int32), 0
    starts = np.ones(len(array), bool)
    starts[1:] = pc.not_equal(array[1:], array[:-1]).to_numpy(zero_copy_only=False)
    runs = not starts.all()
    heads = array.filter(pa.array(starts)) if runs else array
    if pc.all(pc.less(heads[:-1], heads[1:])).as_py() is not False:  # all distinct: numbered as they come
        codes, count = np.arange(len(heads), dtype=np.int32), len(heads)
    else:
        encoded = pc.dictionary_encode(heads)
        codes, count = encoded.indices.to_numpy(), len(encoded.dictionary)
    return (codes[np.cumsum(starts) - 1] if runs else codes).astype(np.int32, copy=False), count


def _blank(captions):
    """How many of ``captions`` (Arrow strings) are empty or whitespace only."""
    return pc.sum(pc.or_(pc.equal(pc.binary_length(captions), 0), pc.utf8_is_space(captions))).as_py() or 0


def _build(paths, spool):
    """Parse ``paths`` into the cache's columns and metadata (files: path, first record, records, blank captions)."""
    images, captions = StringSpool(spool, "image"), StringSpool(spool, "caption")
    ids, files, total = _ImageIds(), [], 0
    for path in paths:
        start, blank = total, 0
        for index, items, (records, ok), line_of in _decoded_batches(path):
            if not ok:
                _raise_first_error(path, index, items, records, line_of)
            images.append([r.image for r in records])
            blank += _blank(captions.append([r.caption for r in records]))
            ids.append([r.image_id for r in records])
            total += len(records)
        files.append({"path": path, "start": start, "records": total - start, "blank": blank})
    index, num_images = ids.dense()
    columns = {"image": images.finish(), "caption": captions.finish(), "image_index": pa.array(index)}
    return columns, {"files": files, "num_images": num_images}


class CompactCaptions:
    """The (image, caption, image index) records of caption annotation files, as columns (module docstring).

    ``cache_dir``: the ``build_info.cache_dir`` setting (:func:`~lavis_pformer.datasets.arrow_cache.cache_folder`;
    ``cache_key`` names it in errors). ``files``: per file, {path, start (its first record), records, blank}.
    """

    def __init__(self, paths, key="annotations", cache_dir="auto", cache_key="build_info.cache_dir"):
        self.paths = list(paths)
        for path in self.paths:
            check_file(path, WHAT, key)
        cache = ArrowCache(cache_folder(cache_dir, cache_key))
        self.table = cache.load(KIND, self.paths, lambda spool: _build(self.paths, spool),
                                f"captions of {', '.join(self.paths)}")
        self._views()

    def _views(self):
        columns, metadata = self.table.columns, self.table.metadata
        self.image_buffer, self.image_offsets = string_views(columns["image"])
        self.caption_buffer, self.caption_offsets = string_views(columns["caption"])
        self.image_index = int_view(columns["image_index"])
        self.num_images, self.files = metadata["num_images"], metadata["files"]
        self._image_file_count = None

    def __getstate__(self):
        return {"paths": self.paths, "table": self.table}  # the table pickles as its cache file's path

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def __len__(self):
        return len(self.image_offsets) - 1

    def image(self, i):
        return text_at(self.image_buffer, self.image_offsets, i)

    def caption(self, i):
        return text_at(self.caption_buffer, self.caption_offsets, i)

    def num_image_files(self, up_to=None):
        """The number of distinct image paths; with ``up_to``, counting stops once it is passed (the result is then
        some number above ``up_to``): longer and longer prefixes are counted, which costs little when a large set
        has more files than a check would read."""
        if self._image_file_count is not None:
            return self._image_file_count
        column = self.table.columns["image"]
        length = len(column) if up_to is None else up_to + 1
        while True:
            found = len(pc.unique(column.slice(0, length)))
            if length >= len(column):
                self._image_file_count = found
                return found
            if found > up_to:
                return found
            length *= 4

    def image_files(self):
        """The distinct image paths, in order of first appearance (a list: for the builder's image check)."""
        return pc.unique(self.table.columns["image"]).to_pylist()

    def nbytes(self):
        arrays = (self.image_buffer, self.image_offsets, self.caption_buffer, self.caption_offsets, self.image_index)
        return sum(a.nbytes for a in arrays)


class CompactAnnotationView:
    """``dataset.annotation`` of a compact dataset: ``len`` and ``[i]`` -> {"image", "caption", "instance_id"}, built on
    demand (LAVIS's ``displ_item`` and similar code read it). The original ``image_id`` is not kept."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return {"image": self.records.image(i), "caption": self.records.caption(i), "instance_id": str(i)}
