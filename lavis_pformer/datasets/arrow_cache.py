"""Parsed annotation files kept as memory-mapped Arrow files that every rank and DataLoader worker maps.

A builder parses its annotation files once into a few columns and writes them as one Arrow IPC record batch to
``<folder>/<kind>-<key>.arrow``; later starts (the other ranks, resumes, the next stage) map that file instead of
parsing again. Mapped pages belong to the page cache: the processes of a machine that map the file share one copy
(their PSS divides it), and a forked worker that reads them copies nothing.

- **Key**: the real paths of the source files (one cache file per list of sources) and :data:`FORMAT`.
- **Invalidation**: the file records the size and modification time (ns) of each source, taken before parsing; a
  source whose size or mtime differs (edited, regenerated, touched) makes the file stale and the next start
  rebuilds it in place.
- **Atomic writes**: a build writes ``<name>.<host>.<pid>.tmp`` in the same folder, flushes it to disk and renames
  it over the cache file (``os.replace``): a reader opens the old file or the new one, never half of one, and a
  process that mapped the old file keeps reading it.
- **Concurrent starts**: a process that finds no valid file takes an exclusive ``flock`` on ``<name>.lock``
  (waiting while another process builds), looks again, and builds only if it still finds none; the lock dies with
  its process, so a builder that crashes leaves nothing stale. On a file system without ``flock`` every such
  process builds and renames on its own: correct, only repeated.

The folder is ``build_info.cache_dir``; by default ``$LAVIS_PFORMER_CACHE``, else
``$XDG_CACHE_HOME/lavis_pformer``, else ``~/.cache/lavis_pformer``. With ``cache_dir: false`` each process parses
into a private temporary file that it maps and deletes (nothing is shared or kept).
"""
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from hashlib import sha256

import numpy as np
import pyarrow as pa

from lavis_pformer.datasets.files import local_path
from lavis_pformer.errors import ConfigError, SetupError

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the columns or the metadata of a kind change: older files are then rebuilt
_METADATA = b"lavis_pformer"


def default_folder():
    """$LAVIS_PFORMER_CACHE, else $XDG_CACHE_HOME/lavis_pformer, else ~/.cache/lavis_pformer."""
    if os.environ.get("LAVIS_PFORMER_CACHE"):
        return local_path(os.environ["LAVIS_PFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(local_path(base), "lavis_pformer")


def cache_folder(setting, key):
    """The folder of a ``build_info.cache_dir`` setting (auto or null: :func:`default_folder`; false: None)."""
    if setting is False:
        return None
    if setting in (None, "auto"):
        return default_folder()
    if isinstance(setting, str) and setting:
        return local_path(setting)
    raise ConfigError(f"{key} must be a folder, auto or false, got {setting!r}.")


class StringSpool:
    """A string column built batch by batch: the UTF-8 bytes go to a file in ``folder`` as they come, the offsets
    stay in memory (8 bytes per row); :meth:`finish` makes one Arrow array that maps that file."""

    def __init__(self, folder, name):
        self.path = os.path.join(folder, name)
        self.file = open(self.path, "wb")
        self.ends, self.masks, self.size, self.rows, self.nulls = [], [], 0, 0, 0

    def append(self, values):
        """Add ``values`` (a list of str or None, or an Arrow string array); returns them as an Arrow array."""
        array = values if isinstance(values, pa.Array) else pa.array(values, pa.large_string())
        if array.type != pa.large_string():
            array = array.cast(pa.large_string())
        offsets = np.frombuffer(array.buffers()[1], np.int64, len(array) + 1, array.offset * 8)
        self.file.write(memoryview(array.buffers()[2] or b"")[offsets[0]:offsets[-1]])
        self.ends.append(offsets[1:] - offsets[0] + self.size)
        self.masks.append(np.asarray(array.is_valid()) if array.null_count else len(array))
        self.size += int(offsets[-1] - offsets[0])
        self.rows, self.nulls = self.rows + len(array), self.nulls + array.null_count
        return array

    def finish(self):
        """One array of every row: ``string`` (int32 offsets) while the bytes fit, else ``large_string``."""
        self.file.close()
        offsets = np.concatenate([np.zeros(1, np.int64)] + self.ends)
        kind = pa.string() if self.size < 2 ** 31 else pa.large_string()
        if kind == pa.string():
            offsets = offsets.astype(np.int32)
        data = pa.memory_map(self.path).read_buffer() if self.size else pa.py_buffer(b"")
        validity = None
        if self.nulls:
            valid = np.concatenate([m if isinstance(m, np.ndarray) else np.ones(m, bool) for m in self.masks])
            validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.Array.from_buffers(kind, self.rows, [validity, pa.py_buffer(offsets), data], self.nulls)


def string_views(array):
    """(UTF-8 bytes as uint8 [size], offsets [rows + 1]) of an Arrow string array, as numpy views (no copy)."""
    kind = np.int32 if array.type == pa.string() else np.int64
    offsets = np.frombuffer(array.buffers()[1], kind, len(array) + 1, array.offset * np.dtype(kind).itemsize)
    data = array.buffers()[2]
    return (np.frombuffer(data, np.uint8) if data is not None and data.size else np.zeros(0, np.uint8)), offsets


def int_view(array):
    """The values of an Arrow integer array without nulls, as a numpy view (no copy)."""
    return np.frombuffer(array.buffers()[1], array.type.to_pandas_dtype(), len(array),
                         array.offset * array.type.byte_width)


def text_at(data, offsets, i):
    """Row ``i`` of :func:`string_views`' arrays, decoded."""
    return data[int(offsets[i]):int(offsets[i + 1])].tobytes().decode("utf-8")


def _stamp(sources):
    """[[real path, size, mtime ns]] of each source: what the cache file is valid for."""
    stamp = []
    for path in sources:
        st = os.stat(path)
        stamp.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
    return stamp


def _write(path, columns, metadata):
    """``columns`` ({name: Arrow array}, equal lengths) as one record batch in an Arrow IPC file, flushed to disk."""
    batch = pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))
    schema = batch.schema.with_metadata({_METADATA: json.dumps(metadata)})
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(path):
    """Delete what builders of ``path`` that died left (``<name>.<host>.<pid>.tmp`` and its spool folder); only
    under the lock, when no other builder can be running."""
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        if entry.startswith(name + ".") and entry.endswith((".tmp", ".tmp.spool")):
            logger.info("removing %s, left by a build that did not finish", entry)
            target = os.path.join(folder, entry)
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)


def open_table(path):
    """(record batch mapped from ``path``, its metadata); the batch's buffers are views of the mapping."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    metadata = json.loads(reader.schema.metadata[_METADATA])
    return reader.get_batch(0), metadata


class CachedTable:
    """The columns of a kind of annotation, mapped from the cache file (``path``) or a private temporary file
    (``path`` None). ``columns``: {name: Arrow array}; ``metadata``: what the build returned, plus ``sources``."""

    def __init__(self, batch, metadata, path):
        self.batch, self.metadata, self.path = batch, metadata, path
        self.columns = {name: batch.column(name) for name in batch.schema.names}

    def __len__(self):
        return self.batch.num_rows

    def __reduce__(self):
        """Pickled as the path of its cache file (a spawned worker maps it again), else as the columns themselves."""
        if self.path is None:
            return CachedTable, (self.batch, self.metadata, None)
        return _reopen, (self.path, self.metadata["sources"])


def _reopen(path, sources):
    batch, metadata = open_table(path)
    if metadata["sources"] != sources:
        raise SetupError(f"the annotation cache {path} was rebuilt while this run used the older one (its source "
                         "file changed): restart the run.")
    return CachedTable(batch, metadata, path)


class ArrowCache:
    """Cache files of parsed annotations in ``folder`` (None: private temporary files; module docstring)."""

    def __init__(self, folder):
        self.folder = folder

    def path(self, kind, sources):
        key = sha256(json.dumps([FORMAT, kind, [os.path.realpath(p) for p in sources]]).encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"{kind}-{key}.arrow")

    def load(self, kind, sources, build, label, accept=None):
        """The :class:`CachedTable` of ``sources``: mapped from a valid cache file, else built by
        ``build(spool folder) -> (columns, metadata)`` and written. ``accept(metadata)``: False makes a valid
        file be rebuilt anyway (e.g. it was built under a looser setting). ``label`` names the data in logs."""
        stamp = _stamp(sources)
        if self.folder is None:
            return self._build_private(build, stamp, label)
        path = self.path(kind, sources)
        found = self._valid(path, stamp, accept)
        if found is not None:
            return found
        try:
            os.makedirs(self.folder, exist_ok=True)
            lock = open(path + ".lock", "a")
        except OSError as e:
            logger.warning("%s: cannot use the annotation cache folder %s (%s): parsing without a cache file; set "
                           "build_info.cache_dir to a writable folder to start fast next time", label, self.folder, e)
            return self._build_private(build, stamp, label)
        with lock:
            if self._take(lock, path, label):
                _remove_leftovers(path)
            found = self._valid(path, stamp, accept)  # built by the process this one waited for
            if found is not None:
                return found
            tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
            self._build_file(tmp, build, stamp, label, path)
            os.replace(tmp, path)
        return CachedTable(*open_table(path), path)

    @staticmethod
    def _take(lock, path, label):
        """Lock ``path`` for this process (waiting for another builder); False where the file system has no
        flock."""
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process is building %s; waiting for it", label, path)
            start = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            logger.info("%s: waited %.1f s", label, time.perf_counter() - start)
        except OSError as e:
            logger.warning("%s: no file lock on %s (%s): building without waiting for other processes", label,
                           path, e)
            return False
        return True

    @staticmethod
    def _valid(path, stamp, accept):
        if not os.path.isfile(path):
            return None
        try:
            batch, metadata = open_table(path)
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as e:
            logger.warning("annotation cache %s cannot be read (%s): rebuilding it", path, e)
            return None
        if metadata.get("cache_format") != FORMAT or metadata.get("sources") != stamp:
            return None
        if accept is not None and not accept(metadata):
            return None
        return CachedTable(batch, metadata, path)

    def _build_file(self, path, build, stamp, label, cache_path):
        """Build into ``path`` (the columns spooled in ``<path>.spool``); errors that come from a full disk name
        the folder and the fix."""
        start = time.perf_counter()
        spool = path + ".spool"
        os.mkdir(spool)
        try:
            columns, metadata = build(spool)
            _write(path, columns, dict(metadata, cache_format=FORMAT, sources=stamp))
        except BaseException as e:
            if os.path.exists(path):
                os.remove(path)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SetupError(f"{label}: cannot write the annotation cache {cache_path or path} ({e.strerror}). "
                                 "Free space there, or set build_info.cache_dir to a folder with room (or false: no "
                                 "cache file).") from None
            raise
        finally:
            shutil.rmtree(spool, ignore_errors=True)
            pa.default_memory_pool().release_unused()  # else the pool keeps what the build freed, and forks share it
        logger.info("%s: parsed in %.1f s into %s (%.0f MB)", label, time.perf_counter() - start,
                    cache_path or "a private temporary file", os.path.getsize(path) / 2 ** 20)

    def _build_private(self, build, stamp, label):
        folder = tempfile.mkdtemp(prefix="lavis_pformer_annotations_")
        try:
            path = os.path.join(folder, "table.arrow")
            self._build_file(path, build, stamp, label, None)
            batch, metadata = open_table(path)  # the mapping keeps the data after the file is deleted
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return CachedTable(batch, metadata, None)

