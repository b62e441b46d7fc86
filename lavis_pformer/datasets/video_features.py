"""Video captioning on precomputed clip features, registered as the LAVIS builder ``video_features_caption``.

Captions in VATEX's layout, one ``<videoID>.npy`` of clip features per video; train items are (video, caption)
pairs, val / test items videos scored against a COCO ground truth written at build. Nothing is downloaded; errors
name the file (:class:`FeatureFileError` for a feature file that cannot be used). Formats and settings: docs/data.md.
"""

import hashlib
import json
import logging
import os

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import BaseDataset
from omegaconf import OmegaConf

from lavis_pformer.datasets.files import check_folder, load_json, local_path
from lavis_pformer.datasets.local_builder import LocalDatasetBuilder
from lavis_pformer.errors import ConfigError, DataError, MissingFileError, OutputFolderError
from torch.utils.data.dataloader import default_collate

logger = logging.getLogger(__name__)

DEFAULT_GT_DIR = os.path.join("output", "cache", "video_features_caption")
CLIP_SAMPLING = ("uniform", "truncate")
FEATURES_KEY, MASK_KEY = "clip_features", "clip_mask"


class FeatureFileError(DataError):
    """A clip-feature file exists but cannot be used (unreadable, wrong shape, non-finite values)."""


# ---------------------------------------------------------------------------------------------------------
# feature files and clips
# ---------------------------------------------------------------------------------------------------------

def load_clip_features(path, feat_dim):
    """``path`` (.npy) -> float32 array [clips, feat_dim]; [1, clips, feat_dim] is accepted (VATEX I3D)."""
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "does not exist"
        raise MissingFileError(
            f"feature file {path} {state}. Every video of the caption file needs <features>/<videoID>.npy: "
            "check build_info.features.storage or remove the video from the caption file."
        )
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated file, not an .npy file, pickled object array, ...
        raise FeatureFileError(
            f"feature file {path} cannot be read as a .npy array ({type(e).__name__}: {e}). Regenerate it."
        ) from e
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise FeatureFileError(f"feature file {path} holds {getattr(array, 'dtype', type(array))}, not numbers.")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise FeatureFileError(
            f"feature file {path} has shape {tuple(array.shape)} ({array.ndim} dimensions); expected "
            f"[clips, {feat_dim}] (or [1, clips, {feat_dim}])."
        )
    if array.shape[1] != feat_dim:
        raise FeatureFileError(
            f"feature file {path} has clip features of width {array.shape[1]} (shape {tuple(array.shape)}) but "
            f"the dataset's feat_dim is {feat_dim}; set datasets.<name>.feat_dim (and model.feat_dim) to the "
            "width of the features."
        )
    if array.shape[0] == 0:
        raise FeatureFileError(f"feature file {path} holds no clips (shape {tuple(array.shape)}).")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise FeatureFileError(f"feature file {path} contains NaN or infinite values. Regenerate it.")
    return array


def select_clips(num_clips, max_clips, mode="uniform"):
    """Indices of the clips kept from a video of ``num_clips`` clips (at most ``max_clips``, in order)."""
    if mode not in CLIP_SAMPLING:
        raise ValueError(f"clip_sampling must be one of {list(CLIP_SAMPLING)}, got {mode!r}")
    if num_clips <= max_clips:
        return np.arange(num_clips)
    if mode == "truncate":
        return np.arange(max_clips)
    # evenly spaced over the whole video; distinct because num_clips > max_clips
    return np.round(np.linspace(0, num_clips - 1, max_clips)).astype(np.int64)


def pad_clips(features, max_clips=None):
    """List of [T_i, D] tensors -> (features [B, T, D] zero-padded, mask [B, T] long); T = max T_i (<= max_clips)."""
    if not features:
        raise ValueError("pad_clips: empty batch")
    if max_clips is not None:
        features = [f[:max_clips] for f in features]
    length = max(f.shape[0] for f in features)
    dim = features[0].shape[1]
    padded = features[0].new_zeros(len(features), length, dim)
    mask = torch.zeros(len(features), length, dtype=torch.long)
    for i, f in enumerate(features):
        if f.shape[1] != dim:
            raise ValueError(f"pad_clips: clip features of widths {dim} and {f.shape[1]} in one batch")
        padded[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    return padded, mask


# ---------------------------------------------------------------------------------------------------------
# caption files (VATEX layout) and the COCO ground truth
# ---------------------------------------------------------------------------------------------------------

def load_vatex_captions(path, key="build_info.annotations.<split>.storage"):
    """[(videoID, [English captions])] from a VATEX-format JSON file; errors name the file and entry."""
    records = load_json(path, "caption file", key)
    if not isinstance(records, list):
        raise DataError(
            f"caption file {path}: expected VATEX's layout, a JSON list of {{\"videoID\": str, \"enCap\": [str, "
            f"...]}}, got a JSON {type(records).__name__}."
        )
    videos = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("videoID"), str) or not rec["videoID"]:
            raise DataError(f"caption file {path}, entry {i}: needs a non-empty string \"videoID\".")
        caps = rec.get("enCap")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(
                f"caption file {path}, entry {i} (videoID {rec['videoID']!r}): \"enCap\" must be a non-empty list "
                "of non-empty English captions (VATEX's public test split has none: it cannot be trained on or "
                "scored offline)."
            )
        videos.append((rec["videoID"], [c.strip() for c in caps]))
    return videos


def coco_ground_truth(videos):
    """COCO caption ground truth of ``videos`` [(videoID, captions)]; image ids are the list indices."""
    images, annotations = [], []
    for index, (video_id, captions) in enumerate(videos):
        images.append({"id": index, "file_name": video_id})
        for caption in captions:
            annotations.append({"image_id": index, "id": len(annotations), "caption": caption})
    return {"info": {"description": "video_features_caption ground truth"}, "licenses": [], "type": "captions",
            "images": images, "annotations": annotations}


def write_coco_ground_truth(videos, gt_dir, name):
    """Write (atomically; once per content) the COCO ground truth of ``videos``; returns its absolute path."""
    content = json.dumps(coco_ground_truth(videos), sort_keys=True).encode("utf-8")
    digest = hashlib.sha1(content).hexdigest()[:12]
    gt_dir = os.path.abspath(gt_dir)
    path = os.path.join(gt_dir, f"{name}_{digest}_coco_gt.json")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(gt_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)  # ranks write identical bytes; the last replace wins
    except OSError as e:
        raise OutputFolderError(
            f"cannot write the COCO ground truth {path} ({e.strerror}); set "
            "datasets.video_features_caption.build_info.gt_dir to a writable folder."
        ) from e
    return path


# ---------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------

class VideoFeatureCaptionDataset(BaseDataset):
    """Training pairs: one item per (video, English caption)."""

    def __init__(self, text_processor, features_root, videos, feat_dim, max_clips, clip_sampling="uniform"):
        super().__init__(vis_processor=None, text_processor=text_processor, vis_root=features_root, ann_paths=[])
        self.feat_dim, self.max_clips, self.clip_sampling = int(feat_dim), int(max_clips), clip_sampling
        select_clips(1, self.max_clips, clip_sampling)  # validates the mode
        self.video_ids = [video_id for video_id, _ in videos]
        self.annotation = self._annotations(videos)
        self._add_instance_ids()

    @staticmethod
    def _annotations(videos):
        return [{"video_index": i, "caption": c} for i, (_, caps) in enumerate(videos) for c in caps]

    def feature_path(self, video_index):
        return os.path.join(self.vis_root, self.video_ids[video_index] + ".npy")

    def clip_features(self, video_index):
        """[clips <= max_clips, feat_dim] float tensor of one video."""
        array = load_clip_features(self.feature_path(video_index), self.feat_dim)
        keep = select_clips(array.shape[0], self.max_clips, self.clip_sampling)
        return torch.from_numpy(np.ascontiguousarray(array[keep]))

    def __getitem__(self, index):
        ann = self.annotation[index]
        return {
            FEATURES_KEY: self.clip_features(ann["video_index"]),
            "text_input": self.text_processor(ann["caption"]),
            "image_id": ann["video_index"],
            "instance_id": ann["instance_id"],
        }

    def collater(self, samples):
        """Pads ``clip_features`` to the batch's longest video and adds ``clip_mask``; the rest as default_collate."""
        features, mask = pad_clips([s[FEATURES_KEY] for s in samples], self.max_clips)
        batch = default_collate([{k: v for k, v in s.items() if k != FEATURES_KEY} for s in samples])
        batch[FEATURES_KEY], batch[MASK_KEY] = features, mask
        return batch


class VideoFeatureCaptionEvalDataset(VideoFeatureCaptionDataset):
    """Evaluation: one item per video; ``coco_gt_file`` is the split's COCO caption ground truth."""

    def __init__(self, text_processor, features_root, videos, feat_dim, max_clips, clip_sampling="uniform",
                 coco_gt_file=None):
        super().__init__(text_processor, features_root, videos, feat_dim, max_clips, clip_sampling)
        self.coco_gt_file = coco_gt_file

    @staticmethod
    def _annotations(videos):
        return [{"video_index": i, "captions": caps} for i, (_, caps) in enumerate(videos)]

    def __getitem__(self, index):
        ann = self.annotation[index]
        return {
            FEATURES_KEY: self.clip_features(ann["video_index"]),
            "image_id": ann["video_index"],
            "instance_id": ann["instance_id"],
        }


@registry.register_builder("video_features_caption")
class VideoFeaturesCaptionBuilder(LocalDatasetBuilder):
    """VATEX-style video captions over precomputed clip features (docs/data.md)."""

    NAME = "video_features_caption"
    train_dataset_cls, eval_dataset_cls = VideoFeatureCaptionDataset, VideoFeatureCaptionEvalDataset

    def _settings(self):
        feat_dim, max_clips = self.config.get("feat_dim"), self.config.get("max_clips")
        for key, value in (("feat_dim", feat_dim), ("max_clips", max_clips)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"datasets.{self.NAME}.{key} must be a positive integer, got {value!r}")
        sampling = self.config.get("clip_sampling", "uniform")
        if sampling not in CLIP_SAMPLING:
            raise ConfigError(f"datasets.{self.NAME}.clip_sampling must be one of {list(CLIP_SAMPLING)}, "
                              f"got {sampling!r}")
        return feat_dim, max_clips, sampling

    def _features_root(self):
        key = self._key("features", "storage")
        info = self.config.build_info.get("features")
        if info is None:
            raise ConfigError(f"set {key} to the folder holding one <videoID>.npy per video.")
        root = self._path(info, "storage", key)
        check_folder(root, "feature folder", key)
        return root

    def _split_videos(self, split, info):
        key = self._key("annotations", split, "storage")
        storage = None if OmegaConf.is_missing(info, "storage") else info.get("storage")
        paths = [storage] if isinstance(storage, str) else list(storage or [])
        if not paths:
            raise ConfigError(f"set {key} to a VATEX-format caption file (or a list of files).")
        paths = [local_path(p) for p in paths]
        videos, seen = [], {}
        for path in paths:
            for video_id, caps in load_vatex_captions(path, key):
                if video_id in seen:
                    raise DataError(f"videoID {video_id!r} appears twice in {split} ({seen[video_id]} and {path}).")
                seen[video_id] = path
                videos.append((video_id, caps))
        if not videos:
            raise DataError(f"{key}: {paths} hold no videos.")
        return paths, videos

    @staticmethod
    def _check_features(root, videos, feat_dim, split):
        missing = [v for v, _ in videos if not os.path.isfile(os.path.join(root, v + ".npy"))]
        if missing:
            raise MissingFileError(
                f"{len(missing)} of the {len(videos)} {split} videos have no feature file in {root}, e.g. "
                f"{os.path.join(root, missing[0] + '.npy')}. Extract their features or remove them from the "
                "caption file."
            )
        load_clip_features(os.path.join(root, videos[0][0] + ".npy"), feat_dim)  # shape check of the first file

    def build(self):
        self.build_processors()
        feat_dim, max_clips, sampling = self._settings()
        root = self._features_root()
        gt_dir = self.config.build_info.get("gt_dir") or DEFAULT_GT_DIR
        datasets = {}
        for split, info in self._splits().items():
            paths, videos = self._split_videos(split, info)
            self._check_features(root, videos, feat_dim, split)
            common = dict(features_root=root, videos=videos, feat_dim=feat_dim, max_clips=max_clips,
                          clip_sampling=sampling)
            if split == "train":
                datasets[split] = self.train_dataset_cls(text_processor=self.text_processors["train"], **common)
            else:
                stem = os.path.splitext(os.path.basename(paths[0]))[0]
                gt = write_coco_ground_truth(videos, gt_dir, stem if split in stem else f"{stem}_{split}")
                datasets[split] = self.eval_dataset_cls(
                    text_processor=self.text_processors["eval"], coco_gt_file=gt, **common
                )
                logger.info("%s %s: COCO ground truth %s", self.NAME, split, gt)
            logger.info("%s %s: %d videos, %d items from %s", self.NAME, split, len(videos), len(datasets[split]),
                        paths)
        return datasets
