"""``LocalDatasetBuilder``: the base of the plugin's dataset builders, which read local files only.

LAVIS's BaseDatasetBuilder downloads every annotation URL that is not an existing local file into its
cache root; these builders never download (their ``build()`` checks the paths and names the missing
file instead), and a run config only overrides what differs from the builder's default yaml.
"""
import os
import re

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder, load_dataset_config
from omegaconf import OmegaConf

from lavis_pformer.datasets.files import local_path
from lavis_pformer.errors import ConfigError

DATASET_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "datasets")


class LocalDatasetBuilder(BaseDatasetBuilder):
    """A builder whose config is merged over its default yaml and whose data are never downloaded.

    ``NAME`` is the builder's registered name (its default config is ``configs/datasets/<NAME>.yaml``);
    ``TRAIN`` whether its ``build_info.annotations`` may give a ``train`` split. Every other split name (letters,
    digits, ``_``: ``val``, ``test``, ``test_ood``...) is an evaluation split.
    """

    NAME = None
    TRAIN = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.NAME:
            cls.DATASET_CONFIG_DICT = {"default": os.path.join(DATASET_CONFIG_DIR, f"{cls.NAME}.yaml")}

    def __init__(self, cfg=None):
        default = load_dataset_config(self.default_config_path())
        if isinstance(cfg, str):
            cfg = load_dataset_config(cfg)
        super().__init__(default if cfg is None else OmegaConf.merge(default, cfg))

    def _download_data(self):
        """Nothing to download: files are local and are checked in build()."""

    def _key(self, *parts):
        return ".".join(("datasets", self.NAME, "build_info") + parts)

    def _path(self, node, field, key, required=True):
        value = None if OmegaConf.is_missing(node, field) else node.get(field)
        if value in (None, ""):
            if required:
                raise ConfigError(f"set {key} to a local path.")
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a single path, got {value!r}.")
        return local_path(value)

    def _splits(self):
        annotations = self.config.build_info.get("annotations") or {}
        splits = {}
        examples = ("train, " if self.TRAIN else "") + "val, test"
        for split, info in annotations.items():
            if (split == "train" and not self.TRAIN) or not re.fullmatch(r"\w+", str(split)):
                raise ConfigError(
                    f"{self._key('annotations', split)}: unknown split; {self.NAME} takes "
                    + ("a train split and " if self.TRAIN else "")
                    + f"evaluation splits named with letters, digits and _ (e.g. {examples})."
                )
            splits[split] = info
        if not splits:
            raise ConfigError(f"set {self._key('annotations')}.<split>.storage for at least one split (e.g. {examples}).")
        return splits
