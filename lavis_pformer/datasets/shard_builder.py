"""The LAVIS builder ``image_text_shards``: image-caption pairs in webdataset tar shards, for training.

Registered beside LAVIS's ``laion2B_multi`` (``Laion2BMultiBuilder``), which reads the same layout but resamples
shards with replacement on every rank and worker, reads the caption from ``.json`` only and drops every
unreadable sample with a warning and no count. Here (docs/data.md): local shards checked before training
(:mod:`~lavis_pformer.datasets.shard_files`), disjoint shards per rank and worker, the caption file chosen by
``caption_key``, every skipped sample or shard counted against ``max_bad_share``, and a position for resuming
(:mod:`~lavis_pformer.datasets.shard_stream`). Only a ``train`` split; it streams without end, so it trains under
``runner_iter_pformer``.
"""
import logging

from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_pformer.datasets.local_builder import LocalDatasetBuilder
from lavis_pformer.datasets.shard_files import check_shards, expand_shards
from lavis_pformer.datasets.shard_samples import BadShare, SampleFormat
from lavis_pformer.datasets.shard_stream import ShardCaptionDataset

logger = logging.getLogger(__name__)


@registry.register_builder("image_text_shards")
class ImageTextShardsBuilder(LocalDatasetBuilder):
    """Image-caption pairs from local webdataset shards (module docstring; keys in its default yaml)."""

    NAME = "image_text_shards"
    SPLITS = ("train",)
    train_dataset_cls = ShardCaptionDataset

    def build(self):
        self.build_processors()
        info = self.config.build_info
        prefix = self._key("")
        storage = None if OmegaConf.is_missing(info, "storage") else info.get("storage")
        shards = expand_shards(storage, self._key("storage"))
        sample_format = SampleFormat(info.get("image_key"), info.get("caption_key"), info.get("caption_field"),
                                     label=prefix)
        bad_share = BadShare(info.get("max_bad_share"), info.get("bad_share_window"), label=prefix)
        label = f"datasets.{self.NAME}"
        check_shards(shards, sample_format, label, self._key("storage"))
        dataset = self.train_dataset_cls(shards, self.vis_processors["train"], self.text_processors["train"],
                                         sample_format, bad_share, info.get("shuffle_buffer"), label=label)
        logger.info("%s: %d shards (%s ... %s), %s", label, len(shards), shards[0], shards[-1], sample_format.describe())
        return {"train": dataset}
