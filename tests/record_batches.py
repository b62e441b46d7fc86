"""train.py that also records every training batch it trains on, for the shard tests (tests/test_shards_training.py).

    python tests/record_batches.py --cfg-path run.yaml [--options ...]      # or under torchrun

Before each step, rank r appends one JSON line to ``batches_rank<r>.jsonl`` in the working directory: the inner
epoch, the iteration in it and the ids of the batch's samples (``instance_id`` of shard samples,
``<shard file>/<key>``; ``image_id`` of map-style caption samples; else the captions).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavis_pformer import cli, tasks  # noqa: E402

_train_step = tasks.LossTermLoggingMixin.train_step


def recording_train_step(self, model, samples):
    ids = samples.get("instance_id", samples.get("image_id", samples.get("text_input")))
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    with open(f"batches_rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": samples["epoch"], "iters": samples["iters"], "ids": [str(i) for i in ids]}) + "\n")
    return _train_step(self, model, samples)


tasks.LossTermLoggingMixin.train_step = recording_train_step

if __name__ == "__main__":
    cli.main("train")
