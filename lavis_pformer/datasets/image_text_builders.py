"""The LAVIS builders ``local_caption`` (image-caption pairs) and ``local_vqa`` (VQA evaluation) over local files.

Nothing is ever downloaded: every path and file is checked at build, and errors name the file, the config key
and the fix. File formats and settings: docs/data.md.
"""
import logging
import os

from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_pformer.datasets.compact import CompactCaptions
from lavis_pformer.datasets.files import check_folder, load_json, local_path
from lavis_pformer.datasets.local_builder import LocalDatasetBuilder
from lavis_pformer.datasets.local_image_text import (LocalCaptionDataset, LocalCaptionEvalDataset,
                                                     LocalVQAEvalDataset, check_images_setting, find_unreadable_images,
                                                     image_path, images_checked, unreadable_images_error)
from lavis_pformer.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

_VQA_QUESTION_KEYS = ("info", "task_type", "data_type", "data_subtype", "license", "questions")


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
            first = image_path(root, records[0]["image"])
            if not os.path.isfile(first):
                raise MissingFileError(
                    f"image file {first} (first entry of {ann_path}) does not exist. The annotation "
                    "'image' paths must be relative to build_info.images.storage; fix that folder "
                    "or the paths."
                )


@registry.register_builder("local_caption")
class LocalCaptionBuilder(_LocalImageTextBuilder):
    """Image-caption pairs from local files (docs/data.md)."""

    NAME = "local_caption"
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
            if split == "train":  # compact columns (CompactCaptions), parsed once into the annotation cache
                records, images = self._train_records(root, paths, key, check)
            else:
                images = []
                for path in paths:
                    records = _load_records(path, key, ("image", "caption", "image_id"))
                    self._check_captions(records, path)
                    self._check_int_ids(records, path)
                    self._check_first_image(root, records, path)
                    images += [image_path(root, rec["image"]) for rec in records]
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
        """The train split's CompactCaptions (parsed once into the annotation cache, then mapped; every record
        checked while parsing) and the image files to check before training (all distinct ones when the check
        applies, see ``find_unreadable_images``; else none)."""
        cache_key = self._key("cache_dir")
        records = CompactCaptions(paths, key, self.config.build_info.get("cache_dir", "auto"), cache_key)
        for file in records.files:
            if file["records"]:
                self._check_first_image(root, [{"image": records.image(file["start"])}], file["path"])
            if file["blank"]:
                logger.warning(
                    "%s: %d of %d captions are empty or blank; they are kept (the model learns to say nothing for "
                    "those images): remove them from the file if that is not intended.", file["path"], file["blank"],
                    file["records"],
                )
        wanted = images_checked(records.num_image_files, "datasets.local_caption train", check)
        images = [image_path(root, p) for p in records.image_files()] if wanted else []
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
    """VQA evaluation data from local files (docs/data.md)."""

    NAME = "local_vqa"
    TRAIN = False
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
            images = [image_path(root, rec["image"]) for rec in records]
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
