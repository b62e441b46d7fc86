"""Dataset builders of lavis-pformer; importing registers them with LAVIS."""

from lavis_pformer.datasets.sentence_corpus import SentenceCorpusBuilder, SentenceCorpusDataset

__all__ = ["SentenceCorpusBuilder", "SentenceCorpusDataset"]
