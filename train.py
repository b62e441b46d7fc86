"""Train any stage with LAVIS's runner: ``python train.py --cfg-path projects/pformer/train/<stage>.yaml``."""
from lavis_pformer.cli import train

if __name__ == "__main__":
    train()
