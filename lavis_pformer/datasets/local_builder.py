"""``LocalDatasetBuilder``: the base of the plugin's dataset builders, which read local files only.

LAVIS's BaseDatasetBuilder downloads every annotation URL that is not an existing local file into its
cache root; these builders never download (their ``build()`` checks the paths and names the missing
file instead), and a run config only overrides what differs from the builder's default yaml.
"""
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder, load_dataset_config
from omegaconf import OmegaConf


class LocalDatasetBuilder(BaseDatasetBuilder):
    """A builder whose config is merged over its default yaml and whose data are never downloaded."""

    def __init__(self, cfg=None):
        default = load_dataset_config(self.default_config_path())
        if isinstance(cfg, str):
            cfg = load_dataset_config(cfg)
        super().__init__(default if cfg is None else OmegaConf.merge(default, cfg))

    def _download_data(self):
        """Nothing to download: files are local and are checked in build()."""
