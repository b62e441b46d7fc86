"""Evaluate with LAVIS's tasks: ``python evaluate.py --cfg-path projects/pformer/eval/<eval>.yaml``."""
from lavis_pformer.cli import evaluate

if __name__ == "__main__":
    evaluate()
