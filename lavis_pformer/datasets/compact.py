"""Image-caption records in a few numpy arrays instead of one Python dict per sample.

LAVIS's caption datasets (``BaseDataset``) keep the parsed annotation file as a list of dicts: at 4M pairs that is
hundreds of bytes of Python objects per pair, per rank. Forked DataLoader workers share those pages only until they
touch them, and merely reading a dict writes its reference count, so every worker ends up with a private copy
(LAVIS issue #247: hosts running out of memory on large caption sets). :class:`CompactCaptions` keeps:

- the image paths and the captions as two UTF-8 byte buffers with one offset per record into each
  (uint32 offsets while a buffer is under 4 GiB, else int64);
- the image of each record as a dense index (0, 1, ... in order of first appearance of its ``image_id``, as
  LAVIS's ``CaptionDataset.img_ids``), int32.

That is (path bytes + caption bytes + 12) bytes per record, in five numpy arrays: no per-record Python object,
so forked workers read them without copying a page. (With the spawn start method each worker gets a pickled
copy of the arrays.)

Annotation files are read as a stream (a JSON list is decoded one element at a time from a bounded text buffer,
``.jsonl`` line by line): the whole parsed file never exists in memory. Image ids are matched through a 16-byte
digest per record (blake2b of the id's JSON form), sorted with numpy, instead of a Python dict of all ids.
"""
import hashlib
import json
import os
import re
from array import array

import numpy as np

from lavis_pformer.datasets.files import check_file, invalid_json
from lavis_pformer.errors import DataError

REQUIRED = ("image", "caption", "image_id")
_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK_CHARS = 1 << 22


class _Column:
    """Strings appended as UTF-8 into one growing buffer, with their start offsets (8 bytes each while building)."""

    def __init__(self):
        self.data = bytearray()
        self.starts = array("q")

    def append(self, text):
        self.starts.append(len(self.data))
        self.data += text.encode("utf-8")

    def freeze(self):
        """(buffer uint8, offsets [n + 1]) as numpy arrays; the buffer is the bytearray itself (no copy)."""
        self.starts.append(len(self.data))
        dtype = np.uint32 if len(self.data) < 2 ** 32 else np.int64
        offsets = np.frombuffer(self.starts, dtype=np.int64).astype(dtype)
        buffer = np.frombuffer(self.data, dtype=np.uint8) if self.data else np.zeros(0, dtype=np.uint8)
        self.data, self.starts = None, None
        return buffer, offsets


def _json_array_elements(path, what):
    """(index, element) of the JSON list in ``path``, decoded one element at a time from a bounded text buffer."""
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8-sig") as f:
        buffer, pos, eof = "", 0, False

        def fill():
            nonlocal buffer, pos, eof
            more = f.read(_CHUNK_CHARS)
            eof = eof or not more
            buffer, pos = buffer[pos:] + more, 0
            return bool(more)

        def skip_space():
            nonlocal pos
            while True:
                pos = _SPACE.match(buffer, pos).end()
                if pos < len(buffer) or not fill():
                    return buffer[pos] if pos < len(buffer) else ""

        fill()
        first = skip_space()
        if first != "[":
            if first == "":
                raise invalid_json(what, path, "the file is empty")
            raise DataError(f"{what} {path}: expected a JSON list of objects with keys {list(REQUIRED)}, "
                            f"but it starts with {first!r}.")
        pos += 1
        if skip_space() == "]":
            return
        index = 0
        while True:
            while True:  # decode one element; read more text while it is cut off at the end of the buffer
                try:
                    element, end = decoder.raw_decode(buffer, pos)
                    if end < len(buffer) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise invalid_json(what, path, f"entry {index}: {e.msg}") from None
                if not fill():
                    eof = True
            pos = end
            yield index, element
            index += 1
            separator = skip_space()
            if separator == "]":
                return
            if separator != ",":
                found = separator or "the end of the file"
                raise invalid_json(what, path, f"after entry {index - 1}: expected ',' or ']', found {found!r}")
            pos += 1
            skip_space()


def _json_lines(path, what):
    """(index, object) of a JSON-lines file; blank lines are skipped."""
    with open(path, "rb") as f:
        index = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                element = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{what} {path}, line {lineno}: not valid JSON ({e}). Fix or regenerate the "
                                "file.") from None
            yield index, element
            index += 1


def annotation_records(path, key):
    """(index, record) of a caption annotation file: a JSON list, or JSON lines (``.jsonl`` / ``.ndjson``)."""
    what = "annotation file"
    check_file(path, what, key)
    lines = os.path.splitext(path)[1].lower() in (".jsonl", ".ndjson")
    try:
        yield from (_json_lines(path, what) if lines else _json_array_elements(path, what))
    except UnicodeDecodeError as e:
        raise invalid_json(what, path, e) from None


def _digest(value):
    """16 bytes that identify a JSON value (its type and content)."""
    if isinstance(value, str):
        data = b"s" + value.encode("utf-8")
    elif isinstance(value, int) and not isinstance(value, bool):
        data = b"i%d" % value
    else:
        data = b"j" + json.dumps(value, sort_keys=True).encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).digest()


def _groups(digests, n):
    """Records with equal 16-byte digests form a group; groups are numbered by their first record.

    Returns (group of each record, int32 [n]; first record of each group, ascending). Two stable numeric sorts,
    no Python object per record.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    words = np.frombuffer(digests, dtype=np.uint64).reshape(n, 2)
    order = np.lexsort((words[:, 1], words[:, 0]))  # stable: equal digests stay in record order
    ordered = words[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    del ordered
    group_in_order = np.cumsum(starts) - 1
    first = order[starts]  # the smallest record index of each group (stable sort)
    number = np.empty(len(first), dtype=np.int64)
    number[np.argsort(first, kind="stable")] = np.arange(len(first))
    groups = np.empty(n, dtype=np.int32)
    groups[order] = number[group_in_order]
    return groups, np.sort(first)


class CompactCaptions:
    """The (image, caption, image index) records of caption annotation files, in numpy arrays (module docstring).

    ``check_record(index, record, path)`` is called for every record while streaming (validation by the builder).
    """

    def __init__(self, paths, key="annotations", check_record=None):
        images, captions = _Column(), _Column()
        id_digests, path_digests = bytearray(), bytearray()
        self.paths, self.blank = list(paths), 0
        for path in self.paths:
            for index, record in annotation_records(path, key):
                missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
                if missing:
                    raise DataError(f"annotation file {path}, entry {index}: missing {missing} (each entry needs "
                                    f"{list(REQUIRED)}). Fix the entry or regenerate the file.")
                if not isinstance(record["image"], str):
                    raise DataError(f"annotation file {path}, entry {index}: image {record['image']!r} is not a "
                                    "path string. Fix the entry.")
                if check_record is not None:
                    check_record(index, record, path)
                images.append(record["image"])
                captions.append(record["caption"])
                id_digests += _digest(record["image_id"])
                path_digests += _digest(record["image"])
        self.image_buffer, self.image_offsets = images.freeze()
        self.caption_buffer, self.caption_offsets = captions.freeze()
        n = len(self.image_offsets) - 1
        self.image_index, first_of_each_id = _groups(id_digests, n)
        self.num_images = len(first_of_each_id)
        del id_digests, first_of_each_id
        # distinct image files (for the builder's image check): the first record of each
        self._first_of_each_file = _groups(path_digests, n)[1]

    def __len__(self):
        return len(self.image_offsets) - 1

    @staticmethod
    def _text(buffer, offsets, i):
        return buffer[int(offsets[i]):int(offsets[i + 1])].tobytes().decode("utf-8")

    def image(self, i):
        return self._text(self.image_buffer, self.image_offsets, i)

    def caption(self, i):
        return self._text(self.caption_buffer, self.caption_offsets, i)

    def num_image_files(self):
        """Distinct image paths (known until ``finish_build``)."""
        return len(self._first_of_each_file)

    def image_files(self):
        """The distinct image paths, in order of first appearance (a list: for the builder's image check)."""
        return [self.image(int(i)) for i in self._first_of_each_file]

    def finish_build(self):
        """Drop what only the builder needs (the first record of each image file)."""
        self._first_of_each_file = np.zeros(0, dtype=np.int64)

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
