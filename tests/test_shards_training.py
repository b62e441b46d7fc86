"""Training on webdataset shards through train.py and runner_iter_pformer (docs/data.md):

- the smoke-scale chain from shards: the tiny world converted with ``python -m lavis_pformer.datasets.to_shards``,
  stage 1 on the shards mixed with ``local_caption`` (``train_dataset_ratios``) and stage 2 on the shards alone, with
  the repository's projects/pformer/tiny configs, 2 gloo ranks x 2 DataLoader workers: each rank trains on its own
  shards only (disjoint), both datasets of the mix are used, the checkpoint holds every reader's position;
- resume guarantee: a stage-2 run on 16 shards (1 rank x 2 workers, shuffle buffer 8) mixed 1 : 1 with
  local_caption, killed with SIGKILL between checkpoints and resumed from checkpoint_last.pth, trains on no shard
  sample twice within the pass and skips at most the shuffle buffer per worker; up to the checkpoint it trained on
  the uninterrupted run's batches, and after it every batch comes from the same set as in the uninterrupted run
  (the same local_caption batches);
- LAVIS's own ``laion2B_multi`` builder reads the converter's shards and trains under runner_iter_pformer;
- bad input: a missing shard before training, and unreadable samples past the bound in a DataLoader worker, end
  with a short message naming the shard (exit status 2); the epoch runner and bad ratios are refused.
"""
import glob
import json
import os
import shutil
import types

import pytest
import torch
from omegaconf import OmegaConf

from lavis_pformer.errors import ConfigError
from lavis_pformer.runner_iter import RunnerIterPFormer
from lavis_pformer.runtime import RunnerPFormer

from helpers import make_teacher, only_run_dir, run_script, stage2_config, tiny_workdir
from test_resume import finish, kill_when, launch, load
from test_shards import convert, good, write_shard

TINY = "projects/pformer/tiny"
RECORD = "tests/record_batches.py"


def records(workdir, rank=0):
    """[(global iteration, [sample ids])] of the batches rank ``rank`` trained on (tests/record_batches.py)."""
    path = os.path.join(str(workdir), f"batches_rank{rank}.jsonl")
    lines = [json.loads(line) for line in open(path)]
    return [(r["epoch"] * PER_INNER + r["iters"], r["ids"]) for r in lines]


PER_INNER = 8


# ---------------------------------------------------------------------------------------------------------
# the smoke-scale chain: 2 ranks x 2 workers


@pytest.fixture(scope="module")
def chain(tiny, tmp_path_factory):
    workdir = tiny_workdir(tiny, tmp_path_factory.mktemp("shard_chain"))
    convert(tiny, os.path.join(workdir, "output", "tiny", "shards"))
    stage0 = os.path.join(workdir, "output", "tiny", "stage0_opt", "latest")
    os.makedirs(stage0)
    make_teacher(tiny, os.path.join(stage0, "pformer.pth"))  # where the configs expect stage 0's P-Former
    stage1 = run_script(RECORD, f"{TINY}/pretrain_stage1_shards.yaml", workdir, nproc=2)
    stage2 = run_script("train.py", f"{TINY}/pretrain_stage2_shards.yaml", workdir, nproc=2)
    return {"dir": workdir, "logs": {1: stage1.stderr, 2: stage2.stderr}}


def test_each_rank_trains_on_its_own_shards_mixed_with_local_caption(chain):
    names = [f"{i:05d}.tar" for i in range(8)]
    for rank in range(2):
        batches = records(chain["dir"], rank)
        assert [i for i, _ in batches] == list(range(16))
        shard_batches = [ids for _, ids in batches if "/" in ids[0]]
        caption_batches = [ids for _, ids in batches if "/" not in ids[0]]
        assert shard_batches and caption_batches  # both datasets of the mix (3 : 1)
        shards = {i.split("/")[0] for ids in shard_batches for i in ids}
        assert shards <= set(names[rank::2]) and len(shards) >= 3  # disjoint: rank r reads shards r, r + 2, ...
    log = chain["logs"][1]
    assert "training batches drawn from ['image_text_shards', 'local_caption'] with ratios [3.0, 1.0]" in log
    assert "datasets.image_text_shards rank 0: " in log and " 0 unreadable skipped (0.00%), 0 of " in log
    run_dir = os.path.join(chain["dir"], "output", "tiny", "stage1_shards", "latest")
    checkpoint = load(os.path.join(run_dir, "checkpoint_last.pth"))
    data = checkpoint["data"]
    assert data["format"] == "lavis_pformer/loader-states-v1" and data["world_size"] == 2
    for state in data["ranks"]:
        shards_state, caption_state = state["loaders"]
        assert [r["worker"] for r in shards_state["readers"]] == [0, 1]
        assert caption_state["batches_per_epoch"] == 64 // 2 // 8
    stats = json.loads(open(os.path.join(run_dir, "log.txt")).read().splitlines()[-1])
    assert {"train_loss_itc", "train_loss_itm", "train_loss_lm", "train_loss_align"} <= set(stats)


def test_stage2_trains_on_shards_alone_from_stage1(chain):
    run_dir = os.path.join(chain["dir"], "output", "tiny", "stage2_shards", "latest")
    checkpoint = load(os.path.join(run_dir, "checkpoint_16.pth"))
    assert [s["kind"] for s in checkpoint["data"]["ranks"]] == ["shards", "shards"]
    assert torch.isfinite(torch.tensor(float(json.loads(open(os.path.join(run_dir, "log.txt")).read()
                                                        .splitlines()[-1])["train_loss"])))


# ---------------------------------------------------------------------------------------------------------
# kill between checkpoints, resume


MAX_ITERS, BUFFER = 48, 8


def shard_run_config(tiny, teacher, shards, output_dir, **run):
    cfg = stage2_config(tiny, teacher, output_dir, **{"batch_size_train": 2, "warmup_steps": 4, "num_workers": 2, **run})
    cfg["datasets"] = {"image_text_shards": {
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
        "build_info": {"storage": shards, "shuffle_buffer": BUFFER}}}
    cfg["run"].pop("max_epoch")
    cfg["run"].update(runner="runner_iter_pformer", max_iters=MAX_ITERS, iters_per_inner_epoch=PER_INNER)
    return cfg


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    return make_teacher(tiny, tmp_path_factory.mktemp("teacher") / "pformer.pth")


@pytest.fixture(scope="module")
def resumed(tiny, teacher, tmp_path_factory):
    """A uninterrupted; B killed once checkpoint_16 exists; C resumed from B's checkpoint_last.pth. Shards (128
    samples in 16 shards of 8: 64 per worker) mixed 1 : 1 with local_caption; 48 iterations of batch 2 take at most
    48 samples of each worker: all in pass 0."""
    work = tmp_path_factory.mktemp("shard_resume")
    shards = convert(tiny, work / "shards", times=2)
    dirs = {}
    for name in "abc":
        os.makedirs(work / name)
        dirs[name] = str(work / name)

    def cfg():
        mixed = shard_run_config(tiny, teacher, shards, "out")
        mixed["datasets"]["local_caption"] = stage2_config(tiny, teacher, "out")["datasets"]["local_caption"]
        mixed["run"]["train_dataset_ratios"] = {"image_text_shards": 1, "local_caption": 1}
        return mixed

    run_a, run_b = (launch(cfg(), dirs[n], n, script=RECORD) for n in "ab")
    kill_when(run_b, lambda: glob.glob(os.path.join(dirs["b"], "out", "*", "checkpoint_16.pth")), poll=0.005)
    b_run = only_run_dir(os.path.join(dirs["b"], "out"))
    checkpoint = os.path.join(dirs["c"], "checkpoint_last.pth")
    shutil.copy(os.path.join(b_run, "checkpoint_last.pth"), checkpoint)
    k = load(checkpoint)["iters"]
    shutil.copy(os.path.join(b_run, f"checkpoint_{k}.rng.pth"), dirs["c"])
    run_c = launch(cfg(), dirs["c"], "c", [f"run.resume_ckpt_path={checkpoint}"], script=RECORD)
    logs = {"a": finish(run_a), "c": finish(run_c)}
    return {"dirs": dirs, "logs": logs, "k": k, "checkpoint": load(checkpoint),
            "names": sorted(os.path.basename(p) for p in glob.glob(str(work / "shards" / "*.tar")))}


def shard_ids(batches):
    return [i for _, ids in batches if "/" in ids[0] for i in ids]


def test_a_fresh_run_repeats_its_data_order(resumed):
    k, (a, b) = resumed["k"], (records(resumed["dirs"][n]) for n in "ab")
    assert k in (16, 24) and len(a) == MAX_ITERS and len(b) >= k
    assert b[:k] == a[:k]
    assert 0 < len(shard_ids(a)) < 2 * MAX_ITERS  # both sets of the mix


def test_resume_trains_on_no_sample_twice_and_skips_at_most_the_buffer(resumed):
    k = resumed["k"]
    b = [(it, ids) for it, ids in records(resumed["dirs"]["b"]) if it < k]
    a, c = records(resumed["dirs"]["a"]), records(resumed["dirs"]["c"])
    assert [it for it, _ in c] == list(range(k, MAX_ITERS))
    before, after = shard_ids(b), shard_ids(c)
    assert len(set(before + after)) == len(before) + len(after)  # every shard sample at most once in the pass
    data = resumed["checkpoint"]["data"]["ranks"][0]
    readers = next(part["readers"] for part in data["loaders"] if part["kind"] == "shards")
    names = resumed["names"]
    for worker, reader in enumerate(readers):
        mine = set(names[worker::2])  # webdataset's split by worker
        given = [i for i in before if i.split("/")[0] in mine]
        assert reader["pass"] == 0 and reader["bad_samples"] == 0
        assert 0 <= reader["read"] - len(given) <= BUFFER  # what the buffer held at the checkpoint is skipped
    # the mix goes on as in the uninterrupted run: the same set for every batch, the same local_caption batches
    assert [("/" in ids[0]) for _, ids in c] == [("/" in ids[0]) for _, ids in a[k:]]
    assert [ids for _, ids in c if "/" not in ids[0]] == [ids for _, ids in a[k:] if "/" not in ids[0]]
    log = resumed["logs"]["c"]
    assert f"Resuming at iteration {k}" in log and "RNG states restored" in log
    assert "resume: datasets.image_text_shards: 2 of 2 reader(s) continue where they were" in log
    assert os.path.isfile(os.path.join(only_run_dir(os.path.join(resumed["dirs"]["c"], "out")),
                                       f"checkpoint_{MAX_ITERS}.pth"))


# ---------------------------------------------------------------------------------------------------------
# LAVIS's laion2B_multi builder on the converter's shards


def test_lavis_laion_builder_trains_under_runner_iter_pformer(tiny, teacher, tmp_path):
    shards = convert(tiny, tmp_path / "shards")
    cfg = shard_run_config(tiny, teacher, shards, "out", num_workers=0)
    cfg["datasets"] = {"laion2B_multi": {
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
        "text_processor": {"train": {"name": "blip_caption"}},
        "build_info": {"storage": shards}}}
    cfg["run"].update(max_iters=4, iters_per_inner_epoch=4)
    proc = run_script(RECORD, cfg, str(tmp_path))
    batches = records(tmp_path)
    assert [i for i, _ in batches] == [0, 1, 2, 3] and all(len(ids) == 2 for _, ids in batches)
    assert os.path.isfile(os.path.join(only_run_dir(tmp_path / "out"), "checkpoint_4.pth"))
    assert "Saving checkpoint at iteration 4" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_missing_shard_ends_train_py_with_the_shard_and_the_fix(tiny, teacher, tmp_path):
    shards = convert(tiny, tmp_path / "shards")
    cfg = shard_run_config(tiny, teacher, shards.replace("00007", "00009"), "out")
    proc = run_script("train.py", cfg, str(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-2]
    assert last.startswith("train.py: error (missing file): datasets.image_text_shards: 2 of the 10 shards do not exist")
    assert f"{tmp_path}/shards/00008.tar" in last and "Fix datasets.image_text_shards.build_info.storage" in last


def test_unreadable_samples_past_the_bound_stop_the_run_from_a_worker(tiny, teacher, tmp_path):
    bad = {"jpg": b"not a jpeg", "txt": "a caption"}
    shard = write_shard(tmp_path / "0.tar", [good(f"{i:03d}") if i % 3 != 1 else dict(bad, __key__=f"{i:03d}")
                                            for i in range(60)])  # samples 1, 4, 7, ... unreadable
    cfg = shard_run_config(tiny, teacher, shard, "out", num_workers=1)
    cfg["datasets"]["image_text_shards"]["build_info"].update(max_bad_share=0.1, bad_share_window=10, shuffle_buffer=0)
    proc = run_script("train.py", cfg, str(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-2]
    assert last.startswith("train.py: error (data): datasets.image_text_shards rank 0 worker 0: 2 of the 5 samples "
                           "read so far are unreadable (40.0%, past max_bad_share 0.1 judged over at least 10 samples)")
    assert f"the latest: shard {shard}, sample 004: its image does not decode" in last
    assert f"rank 0 worker 0: skipped an unreadable sample (1 so far of 2 read): shard {shard}, sample 001" in proc.stderr


def test_epoch_runner_and_bad_ratios_are_refused(tiny, tmp_path):
    shards = convert(tiny, tmp_path / "shards")
    from lavis.common.registry import registry

    built = registry.get_builder_class("image_text_shards")(OmegaConf.create(
        {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
         "build_info": {"storage": shards}})).build_datasets()
    cfg = types.SimpleNamespace(run_cfg=OmegaConf.create({"runner": "runner_pformer"}))
    with pytest.raises(ConfigError, match="datasets.image_text_shards streams its training data without end .* set "
                                          "run.runner: runner_iter_pformer"):
        RunnerPFormer(cfg, None, None, {"image_text_shards": built}, "job")
    runner = object.__new__(RunnerIterPFormer)
    for ratios, message in (({"image_text_shards": 1, "coco_caption": 1}, "a ratio to each dataset with a train split"),
                            ({"image_text_shards": 0}, "train_dataset_ratios.image_text_shards must be a positive")):
        runner.config = types.SimpleNamespace(run_cfg=OmegaConf.create({"train_dataset_ratios": ratios}))
        with pytest.raises(ConfigError, match=message):
            runner._training_mix({"image_text_shards": built})
