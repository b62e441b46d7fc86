"""Image-text datasets from local files, registered as LAVIS builders ``local_caption`` and ``local_vqa``.

Nothing is ever downloaded. Relative paths in the config are resolved against the current working
directory; ``image`` paths inside annotation files are relative to ``build_info.images.storage``.

``local_caption`` (image-caption pairs; train, val and/or test)::

    build_info:
      images: {storage: DIR}                               # folder the "image" paths are relative to
      annotations:
        train: {storage: DIR/captions_train.json}          # a path or a list of paths
        val:   {storage: DIR/captions_val.json, gt: DIR/coco_gt_val.json}
        test:  {storage: DIR/captions_test.json, gt: DIR/coco_gt_test.json}

  A captions file is a JSON list of ``{"image": rel path, "caption": str, "image_id": str|int}``.
  train -> :class:`LocalCaptionDataset` (a LAVIS ``CaptionDataset``): items ``{"image",
  "text_input", "image_id"}`` with image_id the image's index, as LAVIS does. val/test ->
  :class:`LocalCaptionEvalDataset` (a LAVIS ``CaptionEvalDataset``): items ``{"image", "image_id",
  "instance_id"}`` with the annotation's image_id, which must be an integer or a decimal string
  (LAVIS's captioning task calls ``int()`` on it). The optional ``gt`` (COCO caption ground truth)
  is checked to exist and kept, absolute, as the dataset's ``coco_gt_file`` (None if not given).

``local_vqa`` (VQA evaluation only; val and/or test)::

    build_info:
      images: {storage: DIR}
      annotations:
        val:
          storage: DIR/vqa_val.json                        # LAVIS eval list, one path
          question_file: DIR/vqa_val_questions.json        # VQAv2 questions
          annotation_file: DIR/vqa_val_annotations.json    # VQAv2 annotations (answers)
          answer_list: DIR/vqa_answer_list.json            # optional, for rank inference

  The eval list holds ``{"question_id": int, "question", "image", ...}``; items are LAVIS's
  ``COCOVQAEvalDataset`` items ``{"image", "text_input", "question_id", "instance_id"}`` plus
  ``question_type`` (the record's, or "" if absent). The VQAv2 files are kept, absolute, as
  ``coco_fmt_qust_file`` / ``coco_fmt_anno_file``, the names LAVIS's ``vqa`` task reads to score
  offline with its VQA tools. The build checks that the three files cover the same question ids
  and that every question has a non-empty ``answers`` list, because LAVIS's scorer needs exactly that.

Errors name the file and the fix: a missing or malformed annotation file (FileNotFoundError /
ValueError at build), a caption that is not a string (ValueError at build), a missing image folder
(FileNotFoundError at build), and a missing or unreadable image. Images are checked before the
first step: ``build_info.check_images`` (both builders) is ``auto`` by default, which opens and
decodes every image of a split at build time when the split has at most ``CHECK_IMAGES_AUTO_LIMIT``
(20,000) distinct images (rank 0 checks, with a progress bar on a terminal); ``true`` checks any
number, ``false`` none. Unchecked images that turn out unreadable raise FileNotFoundError /
:class:`ImageReadError` at ``__getitem__``. Blank captions are kept and counted in a warning at
build. ``local_caption`` training data may tolerate unreadable images: with
``build_info.max_bad_images: N`` (default 0) the train dataset skips up to N distinct missing or
unreadable images (each logged once, replaced by the next readable record) and fails with the
count past N, at build when the check found them, else when read. The count is per process
(each rank and DataLoader worker keeps its own). Evaluation splits never skip: every question /
image must get a prediction. Greyscale,
palette and RGBA images are converted to RGB. LAVIS sets PIL's ``LOAD_TRUNCATED_IMAGES`` globally,
so a truncated but otherwise valid image still loads (with its missing part blank).
"""

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist

from lavis.common.dist_utils import get_world_size, is_main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQAEvalDataset
from omegaconf import OmegaConf

from lavis_pformer.datasets.compact import CompactAnnotationView, CompactCaptions
from lavis_pformer.datasets.files import check_folder, load_json, local_path
from lavis_pformer.datasets.local_builder import LocalDatasetBuilder
from lavis_pformer.errors import ConfigError, DataError, MissingFileError, UserError
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

_CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "datasets"
)
_VQA_QUESTION_KEYS = ("info", "task_type", "data_type", "data_subtype", "license", "questions")
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


def _load_records(path, key, required):
    """A JSON list of objects that all have the ``required`` keys."""
    records = load_json(path, "annotation file", key)
    if not isinstance(records, list):
        raise DataError(
            f"annotation file {path}: expected a JSON list of objects with keys {list(required)}, "
            f"got a JSON {type(records).__name__}."
        )
    for i, rec in enumerate(records):
        missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise DataError(
                f"annotation file {path}, entry {i}: missing {missing} (each entry needs "
                f"{list(required)}). Fix the entry or regenerate the file."
            )
    return records


def _image_path(vis_root, rel):
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
    "auto" checks at most ``CHECK_IMAGES_AUTO_LIMIT`` (and says so when there are more)."""
    if setting == "auto" and count > CHECK_IMAGES_AUTO_LIMIT:
        logger.info("%s: %d images, more than %d: not checked before training (set build_info.check_images: "
                    "true to check them all); unreadable ones fail (or are skipped, see max_bad_images) when read",
                    label, count, CHECK_IMAGES_AUTO_LIMIT)
        return False
    return setting is not False


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
            path = _image_path(self.vis_root, self.records.image(i))
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
        image = load_rgb_image(_image_path(self.vis_root, ann["image"]))
        return {
            "image": self.vis_processor(image),
            "image_id": ann["image_id"],
            "instance_id": ann["instance_id"],
        }


class LocalVQAEvalDataset(COCOVQAEvalDataset):
    """LAVIS COCOVQAEvalDataset from local files; items also carry ``question_type``."""

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = load_rgb_image(_image_path(self.vis_root, ann["image"]))
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
            "question_type": str(ann.get("question_type", "")),
        }


class _LocalImageTextBuilder(LocalDatasetBuilder):
    """Shared parts: the image folder and first-image checks."""

    def _image_root(self):
        info = self.config.build_info.get("images")
        key = self._key("images", "storage")
        if info is None:
            raise ConfigError(f"set {key} to the local image folder.")
        root = self._path(info, "storage", key)
        check_folder(root, "image folder", key, ": it is the folder the annotation 'image' paths are relative to; "
                     "relative paths are resolved against the current working directory.")
        return root

    @staticmethod
    def _check_first_image(root, records, ann_path):
        """Catch a wrong image root at build time instead of at the first batch."""
        if records:
            first = _image_path(root, records[0]["image"])
            if not os.path.isfile(first):
                raise MissingFileError(
                    f"image file {first} (first entry of {ann_path}) does not exist. The annotation "
                    "'image' paths must be relative to build_info.images.storage; fix that folder "
                    "or the paths."
                )


@registry.register_builder("local_caption")
class LocalCaptionBuilder(_LocalImageTextBuilder):
    """Image-caption pairs from local files (see the module docstring)."""

    NAME = "local_caption"
    DATASET_CONFIG_DICT = {"default": os.path.join(_CONFIG_DIR, "local_caption.yaml")}
    train_dataset_cls, eval_dataset_cls = LocalCaptionDataset, LocalCaptionEvalDataset

    def build(self):
        self.build_processors()
        root = self._image_root()
        max_bad_images = self.config.build_info.get("max_bad_images", 0)
        if isinstance(max_bad_images, bool) or not isinstance(max_bad_images, int) or max_bad_images < 0:
            raise ConfigError(
                f"{self._key('max_bad_images')} must be an integer >= 0, got {max_bad_images!r}."
            )
        check = check_images_setting(self.config.build_info.get("check_images", "auto"), self._key("check_images"))
        datasets = {}
        for split, info in self._splits().items():
            key = self._key("annotations", split, "storage")
            paths = self._storage_paths(info, key)
            if split == "train":  # streamed into compact arrays (CompactCaptions), checked record by record
                records, images = self._train_records(root, paths, key, check)
            else:
                images = []
                for path in paths:
                    records = _load_records(path, key, ("image", "caption", "image_id"))
                    self._check_captions(records, path)
                    self._check_int_ids(records, path)
                    self._check_first_image(root, records, path)
                    images += [_image_path(root, rec["image"]) for rec in records]
            stage = "train" if split == "train" else "eval"
            procs = dict(
                vis_processor=self.vis_processors[stage],
                text_processor=self.text_processors[stage],
                vis_root=root,
                ann_paths=paths,
            )
            label = f"datasets.local_caption {split}"
            bad = find_unreadable_images(images, label, check)
            if split == "train":
                datasets[split] = self.train_dataset_cls(max_bad_images=max_bad_images, records=records, **procs)
                if len(bad) > max_bad_images:
                    raise unreadable_images_error(bad, records.num_image_files(), label, (
                        "Replace them, or remove their records from the annotation file, or set "
                        f"{self._key('max_bad_images')}: {len(bad)} to skip them in training."))
                for path, problem in bad.items():
                    datasets[split].skip_known_bad_image(path, problem)
                records.finish_build()
            else:
                if bad:
                    raise unreadable_images_error(bad, len(set(images)), label, (
                        "Evaluation needs every image: replace them or remove their records from the annotation "
                        "file (and the ground truth)."))
                gt_key = self._key("annotations", split, "gt")
                gt = self._path(info, "gt", gt_key, required=False)
                if gt is None:
                    logger.warning("local_caption %s: no %s, so no COCO ground truth file", split, gt_key)
                elif not os.path.isfile(gt):
                    raise MissingFileError(
                        f"COCO caption ground truth {gt} does not exist (cwd {os.getcwd()}). Fix "
                        f"{gt_key} or remove it."
                    )
                datasets[split] = self.eval_dataset_cls(coco_gt_file=gt, **procs)
            logger.info("local_caption %s: %d pairs from %s", split, len(datasets[split]), paths)
        return datasets

    def _train_records(self, root, paths, key, check):
        """The train split's CompactCaptions (every record checked as it streams in) and the image files to check
        before training (all distinct ones when the check applies, see ``find_unreadable_images``; else none)."""
        blank, total = {}, {}

        def check_record(index, record, path):
            total[path] = index + 1
            if index == 0:
                self._check_first_image(root, [record], path)
            if not isinstance(record["caption"], str):
                raise DataError(
                    f"annotation file {path}, entry {index}: caption {record['caption']!r} is not a string. Fix the "
                    "entry (a caption is text) or remove it."
                )
            if not record["caption"].strip():
                blank[path] = blank.get(path, 0) + 1

        records = CompactCaptions(paths, key, check_record)
        for path, count in blank.items():
            logger.warning(
                "%s: %d of %d captions are empty or blank; they are kept (the model learns to say nothing for those "
                "images): remove them from the file if that is not intended.", path, count, total[path],
            )
        wanted = images_checked(records.num_image_files(), "datasets.local_caption train", check)
        images = [_image_path(root, p) for p in records.image_files()] if wanted else []
        return records, images

    @staticmethod
    def _storage_paths(info, key):
        storage = None if OmegaConf.is_missing(info, "storage") else info.get("storage")
        if isinstance(storage, str):
            storage = [storage]
        if not storage:
            raise ConfigError(f"set {key} to a local captions JSON file or a list of files.")
        return [local_path(p) for p in storage]

    @staticmethod
    def _check_captions(records, path):
        """Captions must be strings (LAVIS's text processors fail obscurely on others); blank ones are counted."""
        blank = 0
        for i, rec in enumerate(records):
            if not isinstance(rec["caption"], str):
                raise DataError(
                    f"annotation file {path}, entry {i}: caption {rec['caption']!r} is not a string. Fix the "
                    "entry (a caption is text) or remove it."
                )
            blank += not rec["caption"].strip()
        if blank:
            logger.warning(
                "%s: %d of %d captions are empty or blank; they are kept (the model learns to say nothing "
                "for those images): remove them from the file if that is not intended.", path, blank, len(records),
            )

    @staticmethod
    def _check_int_ids(records, path):
        for i, rec in enumerate(records):
            try:
                int(rec["image_id"])
            except (TypeError, ValueError):
                raise DataError(
                    f"annotation file {path}, entry {i}: image_id {rec['image_id']!r} is not an "
                    "integer; LAVIS's captioning evaluation calls int() on it and the COCO ground "
                    "truth uses integer ids. Use integer (or decimal string) image ids."
                ) from None


@registry.register_builder("local_vqa")
class LocalVQABuilder(_LocalImageTextBuilder):
    """VQA evaluation data from local files (see the module docstring)."""

    NAME = "local_vqa"
    SPLITS = ("val", "test")
    DATASET_CONFIG_DICT = {"default": os.path.join(_CONFIG_DIR, "local_vqa.yaml")}
    eval_dataset_cls = LocalVQAEvalDataset

    def build(self):
        self.build_processors()
        root = self._image_root()
        check = check_images_setting(self.config.build_info.get("check_images", "auto"), self._key("check_images"))
        datasets = {}
        for split, info in self._splits().items():
            k = lambda field: self._key("annotations", split, field)  # noqa: E731
            storage = self._path(info, "storage", k("storage"))
            qfile = self._path(info, "question_file", k("question_file"))
            afile = self._path(info, "annotation_file", k("annotation_file"))
            alist = self._path(info, "answer_list", k("answer_list"), required=False)
            records = _load_records(storage, k("storage"), ("question_id", "question", "image"))
            self._check_vqa_files(records, storage, qfile, afile, k)
            self._check_first_image(root, records, storage)
            label = f"datasets.local_vqa {split}"
            images = [_image_path(root, rec["image"]) for rec in records]
            bad = find_unreadable_images(images, label, check)
            if bad:
                raise unreadable_images_error(bad, len(set(images)), label, (
                    "Evaluation needs every image: replace them or remove their questions from the three VQA files."))
            if alist is not None:
                answers = load_json(alist, "answer list", k("answer_list"))
                if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                    raise DataError(f"answer list {alist} must be a JSON list of strings.")
            datasets[split] = self.eval_dataset_cls(
                vis_processor=self.vis_processors["eval"],
                text_processor=self.text_processors["eval"],
                vis_root=root,
                # LAVIS's layout: [eval list, answer list (ignored if missing), questions, annotations]
                ann_paths=[storage, alist or "", qfile, afile],
            )
            logger.info("local_vqa %s: %d questions from %s", split, len(datasets[split]), storage)
        return datasets

    @staticmethod
    def _check_vqa_files(records, storage, qfile, afile, k):
        for i, rec in enumerate(records):
            if not isinstance(rec["question_id"], int) or isinstance(rec["question_id"], bool):
                raise DataError(
                    f"annotation file {storage}, entry {i}: question_id {rec['question_id']!r} must "
                    "be an integer (LAVIS's VQA task reads it back with .item())."
                )
        questions = load_json(qfile, "VQA question file", k("question_file"))
        missing = [key for key in _VQA_QUESTION_KEYS if not isinstance(questions, dict) or key not in questions]
        if missing:
            raise DataError(
                f"VQA question file {qfile} lacks {missing}: LAVIS's VQA scorer needs a VQAv2 question "
                f"file with keys {list(_VQA_QUESTION_KEYS)}."
            )
        annotations = load_json(afile, "VQA annotation file", k("annotation_file"))
        if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
            raise DataError(
                f"VQA annotation file {afile} must be a JSON object with an \"annotations\" list "
                "(VQAv2 format)."
            )
        answered = set()
        for i, ann in enumerate(annotations["annotations"]):
            need = ("question_id", "image_id", "question_type", "answer_type", "answers")
            lacks = [key for key in need if not isinstance(ann, dict) or key not in ann]
            if lacks:
                raise DataError(f"VQA annotation file {afile}, annotation {i}: missing {lacks}.")
            answers = ann["answers"]
            if not (isinstance(answers, list) and answers
                    and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)):
                raise DataError(
                    f"VQA annotation file {afile}, annotation {i} (question_id {ann['question_id']}): "
                    "\"answers\" must be a non-empty list of {\"answer\": str, \"answer_id\": int}."
                )
            answered.add(ann["question_id"])
        asked = {q.get("question_id") for q in questions["questions"] if isinstance(q, dict)}
        unanswered = sorted(asked - answered, key=str)
        if unanswered:
            raise DataError(
                f"VQA question file {qfile}: {len(unanswered)} question(s) have no answers in {afile} "
                f"(e.g. question_id {unanswered[0]}). Every question needs an annotation with "
                "answers; regenerate the files or drop those questions."
            )
        listed = {rec["question_id"] for rec in records}
        for name, ids, path in (("question file", asked, qfile), ("annotation file", answered, afile)):
            if ids != listed:
                diff = sorted(ids ^ listed, key=str)
                raise DataError(
                    f"{storage} and the VQA {name} {path} list different question ids (e.g. "
                    f"{diff[0]}, {len(diff)} in all). LAVIS's scorer needs a prediction for every "
                    "annotated question: use files of the same split and question set."
                )
