"""Smoke test of the benchmark scripts (bench/): each main() at the smallest sizes, one repeat, into a temporary
results directory. Checks the files and keys and that the measured numbers are positive; never the times."""
import json
import math
import os

import pytest
import torch

from helpers import REPO, import_script

(bench_annotations_memory, bench_inference, bench_sentence_corpus_start, bench_shard_loader, bench_stage0_throughput,
 bench_train_step, bench_vq) = (import_script(os.path.join(REPO, "bench", f"{name}.py"))
                               for name in ("bench_annotations_memory", "bench_inference", "bench_sentence_corpus_start",
                                            "bench_shard_loader", "bench_stage0_throughput", "bench_train_step",
                                            "bench_vq"))

MACHINE_KEYS = {"cpu", "cpu_cores", "torch_threads", "torch", "date", "device", "gpu"}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from lavis_pformer.tiny import build_bert, build_opt

    root = tmp_path_factory.mktemp("bench_backbones")
    build_bert(str(root / "bert"))
    build_opt(str(root / "opt"))
    return str(root)


@pytest.fixture(autouse=True)
def keep_process_state():
    """The scripts set torch threads and quiet the root logger / warnings (bench.common.quiet): undo it."""
    import logging
    import warnings

    threads, root = torch.get_num_threads(), logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        yield
    torch.set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)


def small(backbones, results_dir):
    return ["--device", "cpu", "--size", "tiny", "--backbones", backbones, "--results-dir", str(results_dir),
            "--repeats", "1", "--warmup", "0", "--vit-depth", "1", "--image-size", "32", "--num-query-token", "4",
            "--max-txt-len", "16", "--threads", str(torch.get_num_threads())]


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def stats_ok(s):
    return all(positive(s[k]) for k in ("median", "q1", "q3", "min", "max")) and s["n"] == 1


def load(results_dir, script):
    path = os.path.join(results_dir, f"{script}_cpu.json")
    md = os.path.join(results_dir, f"{script}_cpu.md")
    assert os.path.isfile(path) and os.path.isfile(md)
    text = open(md).read()
    assert "| --- |" in text and "torch" in text and "CPU" in text
    data = json.load(open(path))
    assert data["script"] == script
    assert MACHINE_KEYS <= set(data["machine"]) and data["machine"]["device"] == "cpu"
    return data


def test_bench_train_step(backbones, tmp_path):
    bench_train_step.main(small(backbones, tmp_path) + ["--batch", "2"])
    data = load(tmp_path, "bench_train_step")
    assert [r["stage"] for r in data["results"]] == ["stage 2", "stage 1"]
    for r in data["results"]:
        assert r["extra_trainable"] == ([] if r["stage"] == "stage 2" else ["llm_proj.bias", "llm_proj.weight"])
        for key in ("ours", "stock"):
            m = r[key]
            assert stats_ok(m["step"])
            for k in ("step_peak_bytes", "model_bytes", "trainable_bytes", "optimizer_state_bytes", "footprint_bytes",
                      "params", "trainable_params"):
                assert positive(m[k]), (key, k, m[k])
        assert positive(r["ours"]["teacher_bytes"]) and r["stock"]["teacher_bytes"] == 0
        assert stats_ok(r["teacher_forward"]["step"])
        assert all(positive(r["time_ratio"][k]) for k in ("ratio", "paired_median", "paired_min", "paired_max"))
        assert positive(r["footprint_ratio"]) and positive(r["step_peak_ratio"])
        assert all(math.isfinite(v) for v in r["last_loss"].values())


def test_bench_train_step_flan_t5_twin(backbones, tmp_path):
    bench_train_step.main(small(backbones, tmp_path) + ["--batch", "2", "--stages", "2t5", "--tag", "t5"])
    data = json.load(open(os.path.join(tmp_path, "bench_train_step_cpu_t5.json")))
    (r,) = data["results"]
    assert r["stage"] == "stage 2 (Flan-T5)" and r["lavis_class"] == "Blip2T5" and r["extra_trainable"] == []
    assert positive(r["ours"]["teacher_bytes"]) and positive(r["time_ratio"]["ratio"])
    assert all(math.isfinite(v) for v in r["last_loss"].values())
    assert "T5 2+2x40" in data["sizes_line"]


def test_bench_annotations_memory(tmp_path):
    data = bench_annotations_memory.main(["--pairs", "3000", "--ranks", "1", "--workers", "1", "--variants",
                                          "lavis,first", "--start-rounds", "1", "--workdir", str(tmp_path),
                                          "--results-dir", str(tmp_path)])
    assert os.path.isfile(os.path.join(tmp_path, "bench_annotations_memory_cpu.md"))
    assert [(r["pairs"], r["variant"]) for r in data["results"]] == [(3000, "lavis"), (3000, "first")]
    for r in data["results"]:
        assert r["summary"]["samples"] == 3000 and r["summary"]["processes"] == 2 and len(r["starts"]) == 2
        for key in ("rank_rss", "rank_pss", "worker_rss", "worker_pss", "total_pss", "rank_peak_rss", "build_s",
                    "rank_build_peak_anon"):
            assert positive(r["summary"][key]), key
    ratios = data["ratios"][3000]
    assert positive(ratios["first_start"]) and positive(ratios["first_total_pss"])
    assert ratios["first_start_paired_min"] <= ratios["first_start_paired_max"]
    skipped = bench_annotations_memory.main(["--pairs", "2000", "--variants", "lavis", "--lavis-max-pairs", "1000",
                                             "--workdir", str(tmp_path), "--results-dir", str(tmp_path)])
    assert skipped["results"] == [] and skipped["ratios"] == {2000: {}}
    report = open(os.path.join(tmp_path, "bench_annotations_memory_cpu.md")).read()
    assert "LAVIS at 2,000 pairs: not measured" in report


def test_bench_sentence_corpus_start(tmp_path):
    data = bench_sentence_corpus_start.main(["--lines", "2000", "--repeats", "2", "--workdir", str(tmp_path),
                                             "--results-dir", str(tmp_path)])
    assert [r["format"] for r in data["results"]] == ["txt", "jsonl"]
    for r in data["results"]:
        assert r["sentences"] == 2000 and r["offsets_bytes"] == 8 * 2000 and positive(r["cache_file_bytes"])
        assert len(r["rounds"]) == 2 and all(positive(v) for v in r["ratio_to_line_index"].values())
    assert os.path.isfile(os.path.join(tmp_path, "bench_sentence_corpus_start_cpu.md"))


def test_bench_inference(backbones, tmp_path):
    bench_inference.main(small(backbones, tmp_path) + ["--batch", "2", "--num-beams", "2", "--caption-max-len", "4",
                                                       "--vqa-max-len", "3", "--max-txt-len", "32"])
    data = load(tmp_path, "bench_inference")
    assert data["pformer_free"] is True
    presence = data["pformer_presence"]
    assert presence["ours_pformer_params"] == 0 and presence["stock_pformer_params"] == 0
    assert presence["pformer_instances_in_process"] == 0 and presence["checkpoint_teacher_tensors"] == 0
    assert presence["ours_has_teacher"] is False
    assert data["models"]["ours"]["params"] == data["models"]["stock"]["params"] > 0
    for task in ("generate", "vqa"):
        r = data["results"][task]
        assert stats_ok(r["ours"]) and stats_ok(r["stock"])
        assert positive(r["ours_peak_bytes"]) and positive(r["stock_peak_bytes"])
        assert positive(r["time_ratio"]["ratio"]) and positive(r["peak_ratio"])
        assert r["same_outputs"] is True  # the VQA prompt fits in max_txt_len, so both are the same computation
    assert data["vqa_prompt_tokens"] <= 32


def test_bench_vq(tmp_path):
    bench_vq.main(["--device", "cpu", "--vocab", "100,500", "--hidden", "16", "--tokens", "8", "--chunk-size", "64",
                   "--repeats", "1", "--warmup", "0", "--results-dir", str(tmp_path),
                   "--threads", str(torch.get_num_threads())])
    data = load(tmp_path, "bench_vq")
    assert [r["vocab"] for r in data["results"]] == [100, 500]
    for r in data["results"]:
        assert stats_ok(r["chunked"]) and stats_ok(r["dense"])
        assert positive(r["chunked_peak_bytes"]) and positive(r["dense_peak_bytes"])
        assert positive(r["time_ratio"]["ratio"]) and positive(r["peak_ratio"])
        assert r["same_rows_fraction"] == 1.0
        assert r["loss_chunked"] == pytest.approx(r["loss_dense"], rel=1e-5)


def test_bench_stage0_throughput(backbones, tmp_path):
    bench_stage0_throughput.main(small(backbones, tmp_path) + ["--batch", "4"])
    data = load(tmp_path, "bench_stage0_throughput")
    assert set(data["results"]) == set(bench_stage0_throughput.VARIANTS)
    for name, r in data["results"].items():
        assert stats_ok(r["step"]) and positive(r["sentences_per_s"]) and positive(r["peak_bytes"])
        assert positive(r["time_ratio_vs_lm_only"]["ratio"])
        assert all(math.isfinite(v) for v in r["last_losses"].values())
    assert set(data["results"]["lm + c + vq (default)"]["last_losses"]) == {"loss", "loss_lm", "loss_c", "loss_vq"}
    assert set(data["results"]["lm only"]["last_losses"]) == {"loss", "loss_lm"}
    assert positive(data["model"]["trainable_params"])


def test_bench_shard_loader(backbones, tmp_path):
    bench_shard_loader.main(small(backbones, tmp_path) + ["--batch", "2", "--pairs", "16", "--shard-size", "4",
                                                          "--samples", "8", "--loader-batch", "4"])
    data = load(tmp_path, "bench_shard_loader")
    (r,) = data["results"]
    assert stats_ok(r["loader"]) and stats_ok(r["step"])
    assert positive(r["loader_rate"]) and positive(r["step_rate"]) and positive(r["worker_vs_step"]["ratio"])
    assert [row[2] for row in r["workers_per_gpu"]] == [math.ceil(128 / (t * r["loader_rate"])) for t in (0.25, 0.5, 1, 2)]
    assert positive(r["jpeg_bytes"])
