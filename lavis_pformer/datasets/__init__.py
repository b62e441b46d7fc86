"""Dataset builders of lavis-pformer; importing registers them with LAVIS."""

from lavis_pformer.datasets.image_text_builders import LocalCaptionBuilder, LocalVQABuilder
from lavis_pformer.datasets.local_image_text import LocalCaptionDataset, LocalCaptionEvalDataset, LocalVQAEvalDataset
from lavis_pformer.datasets.sentence_corpus import SentenceCorpusBuilder, SentenceCorpusDataset
from lavis_pformer.datasets.shard_builder import ImageTextShardsBuilder
from lavis_pformer.datasets.shard_stream import ShardCaptionDataset
from lavis_pformer.datasets import video_features  # noqa: F401  (video_features_caption)

__all__ = [
    "ImageTextShardsBuilder",
    "LocalCaptionBuilder",
    "LocalCaptionDataset",
    "LocalCaptionEvalDataset",
    "LocalVQABuilder",
    "LocalVQAEvalDataset",
    "SentenceCorpusBuilder",
    "SentenceCorpusDataset",
    "ShardCaptionDataset",
]
