"""Records of large JSON files, decoded in batches by msgspec: the elements of a JSON list, the lines of a file.

Library: `msgspec <https://jcristharif.com/msgspec/>`_. It splits a JSON list into its elements without decoding
them (``list[msgspec.Raw]``: the bytes of each element, syntax checked in C; about 56 bytes per element while a
file is read, the file itself memory-mapped), and decodes each element straight into a typed ``Struct`` of the
fields a builder reads (other fields skipped, wrong types rejected), with no dict per record and faster than
``json``. The alternatives do less here: ``pyarrow.json`` reads JSON lines only and rejects a field whose values
mix numbers and strings (LAVIS's ``image_id`` does); ijson streams but builds a dict per record (about twice
``json.load``'s time on the benchmark's file); orjson decodes whole documents only (the memory of ``json.load``).
"""
import mmap
import os
import re

import msgspec
import numpy as np

BATCH = 1 << 16  # records decoded (then turned into columns) at a time
LINE_CHUNK = 1 << 24  # bytes of whole lines read at a time
_BOM = b"\xef\xbb\xbf"
_FIRST = re.compile(rb"[^ \t\r\n]")
_BYTE = re.compile(r"\s*\(byte (\d+)\)")


class JSONListError(ValueError):
    """The file is not a JSON list: ``str()`` says why and where; ``first`` is its first character when that is
    not ``[`` (else None)."""

    def __init__(self, reason, first=None):
        super().__init__(reason)
        self.first = first


def json_list_batches(path):
    """(index of the first element, [msgspec.Raw], the batch as a JSON list: bytes) of the JSON list in ``path``,
    :data:`BATCH` elements at a time; :class:`JSONListError` if the file is empty, not a list, or not valid JSON.
    Decoding the batch's bytes at once is faster than decoding its elements one by one."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise JSONListError("the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # closed when the last element is dropped
    start = len(_BOM) if mapped[:len(_BOM)] == _BOM else 0
    first = _FIRST.search(mapped, start)
    if first is None:
        raise JSONListError("the file is empty")
    if mapped[first.start()] != ord("["):
        char = mapped[first.start():first.start() + 4].decode("utf-8", "replace")[:1]
        raise JSONListError(f"it starts with {char!r}", first=char)
    view = memoryview(mapped)[start:]
    try:
        elements = msgspec.json.decode(view, type=list[msgspec.Raw])
    except msgspec.DecodeError as e:
        raise JSONListError(_where(str(e), mapped, start)) from None
    base = _address(view)
    for i in range(0, len(elements), BATCH):
        batch = elements[i:i + BATCH]
        first, last = _address(batch[0]) - base, _address(batch[-1]) - base + memoryview(batch[-1]).nbytes
        yield i, batch, b"".join((b"[", view[first:last], b"]"))  # the elements and the separators between them


def _address(buffer):
    """Where the bytes of ``buffer`` (a msgspec.Raw is a view into the file) start in memory."""
    return np.frombuffer(buffer, np.uint8).ctypes.data


def _where(message, mapped, start):
    """msgspec's syntax error as 'line L, column C (byte B): reason'."""
    found = _BYTE.search(message)
    if found is None:  # "Input data was truncated"
        return "the file ends inside the list: it is cut short"
    pos = start + int(found.group(1))
    newlines = np.flatnonzero(np.frombuffer(mapped, np.uint8, pos) == ord("\n"))
    column = pos - (int(newlines[-1]) + 1 if len(newlines) else 0) + 1
    reason = _BYTE.sub("", message).replace("JSON is malformed: ", "")
    return f"line {len(newlines) + 1}, column {column} (byte {pos}): {reason}"


def line_chunks(path):
    """(number of the first line, bytes of whole lines without the last newline) of ``path``, about
    :data:`LINE_CHUNK` bytes at a time; a UTF-8 BOM that starts the file is dropped."""
    with open(path, "rb") as f:
        head = f.read(len(_BOM))
        rest, number = (b"" if head == _BOM else head), 1
        while True:
            data = f.read(LINE_CHUNK)
            if not data:
                if rest:
                    yield number, rest
                return
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[:cut], data[cut + 1:]
            yield number, chunk
            number += chunk.count(b"\n") + 1


def line_batches(path):
    """(number of the first line, [bytes of each line without its newline]) of ``path``, a chunk at a time."""
    for number, chunk in line_chunks(path):
        yield number, chunk.split(b"\n")


def decode_each(decode, items):
    """([decode(item) for item in items], True); where an item fails, its msgspec error stands in the list instead
    and the flag is False."""
    try:
        return [decode(item) for item in items], True
    except msgspec.MsgspecError:
        return [_decode_or_error(decode, item) for item in items], False


def _decode_or_error(decode, item):
    try:
        return decode(item)
    except msgspec.MsgspecError as e:
        return e
