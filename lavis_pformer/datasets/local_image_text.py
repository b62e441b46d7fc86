"""Image-text datasets from local files, with images loaded and checked by errors that name the file and the fix:
the datasets of the builders ``local_caption`` and ``local_vqa``
(:mod:`~lavis_pformer.datasets.image_text_builders`). File formats and settings: docs/data.md.
"""

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist

from lavis.common.dist_utils import get_world_size, is_main_process
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQAEvalDataset

from lavis_pformer.datasets.compact import CompactAnnotationView, CompactCaptions
from lavis_pformer.errors import ConfigError, DataError, MissingFileError, UserError
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

# build_info.check_images: auto checks every image before training when a split has at most this many.
CHECK_IMAGES_AUTO_LIMIT = 20000


class ImageReadError(UserError, OSError):
    """An image file exists but cannot be decoded."""

    kind = "data"


def load_rgb_image(path):
    """Open ``path`` as an RGB PIL image; errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise MissingFileError(
            f"image file {path} does not exist. Check build_info.images.storage (the folder the "
            "annotation 'image' paths are relative to) or remove the record from the annotation file."
        ) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(
            f"image file {path} cannot be read as an image ({type(e).__name__}: {e}). Replace or "
            "regenerate the file, or remove its record from the annotation file."
        ) from e


def image_path(vis_root, rel):
    return os.path.join(vis_root, rel)


def _image_problem(path):
    """None if ``path`` exists and decodes, else the message of its error."""
    try:
        load_rgb_image(path)
    except (FileNotFoundError, ImageReadError) as e:
        return str(e)
    return None


def check_images_setting(value, key):
    """``build_info.check_images``: "auto" (default), true or false."""
    if value in ("auto", True, False):
        return value
    raise ConfigError(f"{key} must be auto, true or false, got {value!r}")


def images_checked(count, label, setting="auto"):
    """Whether ``count`` distinct images are checked before training: True checks every image, False none,
    "auto" checks at most ``CHECK_IMAGES_AUTO_LIMIT`` (and says so when there are more). ``count`` may be a
    function ``count(up_to)`` (see ``CompactCaptions.num_image_files``): called only when needed."""
    if setting is False:
        return False
    if setting == "auto":
        found = count(CHECK_IMAGES_AUTO_LIMIT) if callable(count) else count
        if found > CHECK_IMAGES_AUTO_LIMIT:
            logger.info("%s: more than %d images: not checked before training (set build_info.check_images: true "
                        "to check them all); unreadable ones fail (or are skipped, see max_bad_images) when read",
                        label, CHECK_IMAGES_AUTO_LIMIT)
            return False
    return True


def find_unreadable_images(paths, label, setting="auto"):
    """{path: problem} of the images among ``paths`` that are missing or do not decode, when
    :func:`images_checked`. Under torch.distributed rank 0 checks (a progress bar on a terminal) and sends the
    result to the other ranks.
    """
    paths = list(dict.fromkeys(paths))
    if not images_checked(len(paths), label, setting):
        return {}
    distributed = get_world_size() > 1
    found = [None]
    if is_main_process():
        start = time.time()
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
            problems = tqdm(pool.map(_image_problem, paths), total=len(paths), desc=f"{label}: checking images",
                            unit="img", mininterval=1.0, disable=not sys.stderr.isatty(), leave=False)
            found = [{path: problem for path, problem in zip(paths, problems) if problem is not None}]
        logger.info("%s: checked %d images in %.1f s, %d unreadable", label, len(paths), time.time() - start,
                    len(found[0]))
    if distributed:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def unreadable_images_error(bad, total, label, fix):
    examples = "\n  ".join(list(bad.values())[:3])
    more = f"\n  ... and {len(bad) - 3} more" if len(bad) > 3 else ""
    return DataError(f"{len(bad)} of the {total} images of {label} cannot be read:\n  {examples}{more}\n{fix}")


class LocalCaptionDataset(CaptionDataset):
    """LAVIS CaptionDataset whose images are loaded with clear errors and converted to RGB, and whose annotations
    are stored compactly (:class:`~lavis_pformer.datasets.compact.CompactCaptions`).

    LAVIS's ``BaseDataset.__init__`` parses the annotation files into one Python dict per sample, which forked
    DataLoader workers end up copying (LAVIS issue #247); this class does not call it: it keeps the records in
    numpy arrays (``records``, built from ``ann_paths`` unless given). Items are LAVIS's: ``{"image",
    "text_input", "image_id"}`` with image_id the dense index of the record's image_id in order of first
    appearance. ``annotation`` is a read-only view (``len``, ``[i]`` -> image, caption, instance_id).

    ``max_bad_images``: how many distinct missing / unreadable images are skipped (each replaced by the
    next readable record, with one warning per image) before an error; 0 (default): the first is an error.
    """

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths=(), max_bad_images=0, records=None):
        # Not CaptionDataset.__init__ (a list of dicts, see the docstring): the same attributes, compact records.
        self.vis_root, self.vis_processor, self.text_processor = vis_root, vis_processor, text_processor
        self.records = records if records is not None else CompactCaptions(list(ann_paths))
        self.annotation = CompactAnnotationView(self.records)
        self.max_bad_images = max_bad_images
        self.bad_images = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        n = len(self.records)
        for offset in range(n):
            i = (index + offset) % n
            path = image_path(self.vis_root, self.records.image(i))
            try:
                image = load_rgb_image(path)
            except (FileNotFoundError, ImageReadError) as e:
                self._skip_bad_image(path, e)
                continue
            return {
                "image": self.vis_processor(image),
                "text_input": self.text_processor(self.records.caption(i)),
                "image_id": int(self.records.image_index[i]),
            }
        raise ImageReadError(f"no readable image among the {n} records under {self.vis_root}")

    def skip_known_bad_image(self, path, problem):
        """Skip ``path`` (found unreadable before training), counted and logged as ``__getitem__`` would."""
        self.bad_images.add(path)
        logger.warning("skipping unreadable training image %d of at most %d (build_info.max_bad_images): %s",
                       len(self.bad_images), self.max_bad_images, problem)

    def _skip_bad_image(self, path, error):
        if path in self.bad_images:
            return  # tolerated, counted and logged when first seen (an earlier epoch)
        if len(self.bad_images) >= self.max_bad_images:
            raise type(error)(
                f"{error} [{len(self.bad_images) + 1} unreadable image(s) in this process; "
                f"datasets.local_caption.build_info.max_bad_images is {self.max_bad_images}: raise it to "
                "skip that many unreadable training images]"
            ) from error
        self.bad_images.add(path)
        logger.warning(
            "skipping unreadable training image %d of at most %d (build_info.max_bad_images): %s",
            len(self.bad_images), self.max_bad_images, error,
        )


class LocalCaptionEvalDataset(CaptionEvalDataset):
    """LAVIS CaptionEvalDataset with clear image errors; ``coco_gt_file`` is the COCO GT path or None."""

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, coco_gt_file=None):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self.coco_gt_file = coco_gt_file

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = load_rgb_image(image_path(self.vis_root, ann["image"]))
        return {
            "image": self.vis_processor(image),
            "image_id": ann["image_id"],
            "instance_id": ann["instance_id"],
        }


class LocalVQAEvalDataset(COCOVQAEvalDataset):
    """LAVIS COCOVQAEvalDataset from local files; items also carry ``question_type``."""

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = load_rgb_image(image_path(self.vis_root, ann["image"]))
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
            "question_type": str(ann.get("question_type", "")),
        }
