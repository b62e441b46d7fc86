"""One sample of an image-text shard (img2dataset's layout), and the bound on the unreadable ones.

A shard is a tar file whose members are grouped into samples by their name without the extension: ``{key}.jpg``
with ``{key}.txt`` and/or ``{key}.json`` (img2dataset writes both: the caption as text, and metadata with a
``"caption"`` entry). :class:`SampleFormat` takes the image and the caption out of one such sample (a dict of
``extension -> bytes`` as webdataset groups them) or says why it cannot (:class:`BadSample`);
:class:`BadShare` decides when there are too many unreadable samples or shards to go on.
"""
import io
import json
import math
import tarfile

from PIL import Image

from lavis_pformer.errors import ConfigError, DataError

# Errors that end the reading of a whole shard: a vanished file (OSError), a truncated or damaged tar (tarfile's
# TarError, which is not an OSError; EOFError from a truncated compressed one), duplicate member names (webdataset
# raises ValueError).
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)


class BadSample(Exception):
    """A sample that cannot be used; the message says why (and which files the sample has)."""


def sample_files(raw):
    """The extensions of a webdataset sample (without its ``__key__`` / ``__url__`` entries)."""
    return sorted(k for k in raw if not k.startswith("__"))


class SampleFormat:
    """Where a sample keeps its image and caption.

    ``image_key``: extensions tried in order, ``;``-separated (``"jpg;jpeg;png;webp"``); ``caption_key``: the
    extension of the caption, text (``txt``) or a JSON object (any key ending in ``json``) whose ``caption_field``
    holds it.
    """

    def __init__(self, image_key="jpg;jpeg;png;webp", caption_key="txt", caption_field="caption", label=""):
        self.image_keys = [k.strip().lower() for k in str(image_key).split(";") if k.strip()]
        self.caption_key = str(caption_key).strip().lower()
        self.caption_field = str(caption_field)
        if not self.image_keys or not self.caption_key:
            raise ConfigError(f"{label}image_key and caption_key must name file extensions (e.g. jpg and txt), "
                              f"got {image_key!r} and {caption_key!r}")

    def describe(self):
        caption = self.caption_key + (f"[{self.caption_field!r}]" if self.caption_key.endswith("json") else "")
        return f"image {' or '.join(self.image_keys)}, caption {caption}"

    def image_bytes(self, raw):
        for key in self.image_keys:
            if key in raw:
                return raw[key]
        raise BadSample(f"no image file ({' / '.join('.' + k for k in self.image_keys)}); its files: "
                        f"{sample_files(raw)}")

    def caption(self, raw):
        """The caption string of ``raw``, or BadSample."""
        if self.caption_key not in raw:
            raise BadSample(f"no caption file .{self.caption_key}; its files: {sample_files(raw)}")
        data = raw[self.caption_key]
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as e:
            raise BadSample(f".{self.caption_key} is not UTF-8 text ({e})") from None
        if not self.caption_key.endswith("json"):
            return text
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise BadSample(f".{self.caption_key} is not valid JSON ({e})") from None
        caption = meta.get(self.caption_field) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise BadSample(f".{self.caption_key} has no {self.caption_field!r} string (its keys: "
                            f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__})")
        return caption

    def image(self, raw):
        """The decoded RGB image of ``raw``, or BadSample."""
        data = self.image_bytes(raw)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return img.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise BadSample(f"its image does not decode ({type(e).__name__}: {e})") from None

    def parse(self, raw):
        """(RGB image, caption) of ``raw``; BadSample if either is missing or unreadable."""
        caption = self.caption(raw)  # first: cheap, and a wrong caption_key is the common mistake
        return self.image(raw), caption


class BadShare:
    """The bound on what a reading process may skip: ``max_share`` of what it has read, judged over at least
    ``window`` samples (before that, ``max_share x window`` bad samples are tolerated) and over at least
    ``1 / max_share`` shards (one bad shard among the first hundred at 1 %)."""

    def __init__(self, max_share=0.01, window=1000, label="build_info."):
        ok = isinstance(max_share, (int, float)) and not isinstance(max_share, bool) and 0 <= max_share < 1
        if not ok:
            raise ConfigError(f"{label}max_bad_share must be a number in [0, 1), got {max_share!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"{label}bad_share_window must be a positive integer, got {window!r}")
        self.max_share, self.window = float(max_share), window
        self.shard_window = math.ceil(1 / self.max_share) if self.max_share > 0 else 1

    def samples_allowed(self, read):
        return math.floor(self.max_share * max(read, self.window))

    def shards_allowed(self, opened):
        return math.floor(self.max_share * max(opened, self.shard_window))

    def check_samples(self, bad, read, where, last, fix):
        """DataError if ``bad`` of ``read`` samples is past the bound; ``last`` is the latest problem."""
        self._check(bad, read, self.samples_allowed(read), ("samples read", "are unreadable", self.window, "samples"),
                    where, last, fix)

    def check_shards(self, bad, opened, where, last, fix):
        """DataError if ``bad`` of ``opened`` shards is past the bound."""
        self._check(bad, opened, self.shards_allowed(opened),
                    ("shards opened", "could not be read to the end", self.shard_window, "shards"), where, last, fix)

    def _check(self, bad, seen, allowed, words, where, last, fix):
        counted, problem, window, unit = words
        if bad > allowed:
            raise DataError(
                f"{where}: {bad} of the {seen} {counted} so far {problem} ({bad / max(seen, 1):.1%}, past max_bad_share "
                f"{self.max_share:g} judged over at least {window} {unit}); the latest: {last}. {fix}")
