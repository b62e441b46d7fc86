"""Train any stage with LAVIS's runner: ``python train.py --cfg-path projects/pformer/train/<stage>.yaml``.

A mistake in the config, the data or a checkpoint ends with a short message and exit status 2 (``--debug``
shows its traceback); internal errors end with a traceback.
"""
from lavis_pformer.cli import main

if __name__ == "__main__":
    main("train")
