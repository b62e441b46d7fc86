"""Write a caption set of this project (captions JSON / JSON lines + image folder, the ``local_caption`` format) as
webdataset shards in img2dataset's layout, for ``image_text_shards`` (or LAVIS's ``laion2B_multi``).

    python -m lavis_pformer.datasets.to_shards --captions data/captions_train.json --images data --out shards/train \\
        [--shard-size 1000] [--image-format jpg|keep] [--jpeg-quality 95]

Each record becomes one sample: ``{key}.jpg`` (the image), ``{key}.txt`` (the caption) and ``{key}.json``
(``{"caption", "image", "key"}``), the key being the record's index, zero-padded; several captions of one image are
several samples, as in img2dataset's output. Shards are ``<out>/00000.tar``, ``00001.tar``, ... of ``--shard-size``
samples, each written under a temporary name and renamed once complete. JPEG files are copied byte for byte; other
images are re-encoded as JPEG (``--image-format jpg``, the default: img2dataset's layout, the only one
``laion2B_multi`` reads) or kept as they are under their own extension (``--image-format keep``: ``.png``,
``.webp``, which ``image_text_shards`` reads). Every image is decoded once: an unreadable one stops the conversion
(exit status 2) with its name. Prints the ``build_info.storage`` pattern of the shards.
"""
import argparse
import io
import math
import os
import sys

import webdataset as wds
from PIL import Image

from lavis_pformer.datasets.compact import CompactCaptions
from lavis_pformer.datasets.files import check_folder, local_path
from lavis_pformer.datasets.local_image_text import image_path, load_rgb_image
from lavis_pformer.errors import ConfigError, DataError, UserError, user_message

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_payload(path, image_format, quality):
    """(extension, bytes) of the image file at ``path`` as it goes into a shard; errors name the file."""
    image = load_rgb_image(path)  # decodes it: an unreadable image stops here, named
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        kind = img.format
    if kind == "JPEG" or (image_format == "keep" and kind in KEPT_FORMATS):
        return KEPT_FORMATS[kind], data
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return "jpg", out.getvalue()


def storage_pattern(out, names):
    """The brace pattern of ``names`` (consecutive numbered shards) in ``out``."""
    if len(names) == 1:
        return os.path.join(out, names[0])
    return os.path.join(out, "{%s..%s}.tar" % (names[0][:-4], names[-1][:-4]))


def convert(captions, images, out, shard_size=1000, image_format="jpg", quality=95):
    """Write the records of the ``captions`` files (images relative to ``images``) as shards into ``out``; returns
    (storage pattern, number of samples, number of shards)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"--shard-size must be a positive integer, got {shard_size!r}")
    if image_format not in ("jpg", "keep"):
        raise ConfigError(f"--image-format must be jpg or keep, got {image_format!r}")
    root, out = local_path(images), local_path(out)
    check_folder(root, "image folder", "--images", ": the caption 'image' paths are relative to it.")
    os.makedirs(out, exist_ok=True)
    existing = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    if existing:
        raise ConfigError(f"--out {out} already holds shards ({existing[0]}, {len(existing)} in all): choose an empty "
                          "folder, or delete them first")
    records = CompactCaptions([local_path(p) for p in captions], key="--captions")
    n = len(records)
    if n == 0:
        raise DataError(f"--captions {', '.join(captions)}: no record to write")
    count = math.ceil(n / shard_size)
    width, key_width = max(5, len(str(count - 1))), max(9, len(str(n - 1)))
    names = [f"{s:0{width}d}.tar" for s in range(count)]
    for s, name in enumerate(names):
        partial = os.path.join(out, f".{name}.partial")
        try:
            with wds.TarWriter(partial, mtime=0) as sink:
                for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                    key, rel, caption = f"{i:0{key_width}d}", records.image(i), records.caption(i)
                    ext, data = image_payload(image_path(root, rel), image_format, quality)
                    sink.write({"__key__": key, ext: data, "txt": caption,
                                "json": {"caption": caption, "image": rel, "key": key}})
        except BaseException:
            os.remove(partial)  # never a half-written shard: the shards before it are complete
            raise
        os.replace(partial, os.path.join(out, name))
    return storage_pattern(out, names), n, count


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lavis_pformer.datasets.to_shards",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", nargs="+", required=True,
                        help="caption files: JSON lists (or .jsonl) of {image, caption, image_id}")
    parser.add_argument("--images", required=True, help="the folder the captions' image paths are relative to")
    parser.add_argument("--out", required=True, help="folder for the shards (created; must hold no .tar yet)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--image-format", default="jpg", choices=("jpg", "keep"),
                        help="jpg: non-JPEG images re-encoded as JPEG (default); keep: PNG / WebP kept as they are")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images (default 95)")
    args = parser.parse_args(argv)
    try:
        pattern, n, count = convert(args.captions, args.images, args.out, args.shard_size, args.image_format,
                                    args.jpeg_quality)
    except UserError as e:
        print(f"to_shards: error ({e.kind}): {user_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {n} samples in {count} shard(s)\nstorage: {pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
