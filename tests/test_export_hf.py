"""lavis_pformer.export_hf: a trained BLIP-2 written for transformers' Blip2ForConditionalGeneration, with parity.

LAVIS pins transformers < 4.27, so the transformers side runs in a subprocess (tests/hf_side.py) on the recent
transformers pinned in tests/hf_requirements.txt, installed apart with ``pip install --no-deps --target`` into
``output/hf-transformers/<hash of that file>/`` the first time (about 35 s and 217 MB on the 2-core development
machine, pip's download cache warm) and reused afterwards; ``LAVIS_PFORMER_HF_SITE`` names a ready folder instead.
numpy and torch come from the project's environment.

Models: the tiny Flan-T5-like LLM, a tiny OPT re-initialised with wider weights (so that answers depend on the
question), the tiny BERT Q-Former, and an EVA-shaped ``custom_vit`` (2 blocks, mlp_ratio 4.3637 as eva_clip_g)
whose every weight is random, q/v biases and LayerNorms included. The stage-2 checkpoints carry their run config,
as LAVIS's runner writes it, pointing at a stage-1 checkpoint (w1 = 10) and a P-Former checkpoint.
"""
import ast
import contextlib
import copy
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from omegaconf import OmegaConf
from PIL import Image

from lavis_pformer.text import QA_PROMPT
from lavis_pformer.tiny import SIZES

from helpers import REPO, build_model

HF_REQUIREMENTS = os.path.join(REPO, "tests", "hf_requirements.txt")
VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 4.3637}
NUM_QUERY = 4
LLM_KEY = {"opt": "opt_model", "t5": "t5_model"}
LLM_WIDTH = {"opt": SIZES["opt"]["hidden_size"], "t5": SIZES["t5"]["d_model"]}  # the tiny LLMs
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red square?",
             "what is on the left?", "what shape is in the middle?"]
CAPTION_PROMPTS = {"opt": ["", "a photo of", None], "t5": ["", "a photo of"]}  # None: no text at all
MAX_NEW_TOKENS, VQA_MAX_LEN = 12, 10
LOGIT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The transformers side's environment
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hf_site():
    """Folder with the pinned transformers (installed on first use)."""
    override = os.environ.get("LAVIS_PFORMER_HF_SITE")
    if override:
        if not os.path.isdir(os.path.join(override, "transformers")):
            pytest.fail(f"LAVIS_PFORMER_HF_SITE={override} holds no transformers package")
        return override
    with open(HF_REQUIREMENTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    site = os.path.join(REPO, "output", "hf-transformers", digest)
    if os.path.isfile(os.path.join(site, ".complete")):
        return site
    partial = f"{site}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", partial, "-r", HF_REQUIREMENTS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.fail(f"installing the transformers side failed: {' '.join(cmd)}\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(partial, ".complete"), "w") as f:
        f.write(f"installed from {HF_REQUIREMENTS} in {time.time() - start:.0f} s\n")
    shutil.rmtree(site, ignore_errors=True)
    os.rename(partial, site)
    print(f"\ninstalled the transformers side into {site} in {time.time() - start:.0f} s")
    return site


def run_hf_side(hf_site, spec, workdir):
    spec_path, out_path = os.path.join(workdir, "spec.json"), os.path.join(workdir, "hf_results.pt")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=hf_site, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tests", "hf_side.py"), spec_path, out_path]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"transformers side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out_path, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Trained-looking models and their checkpoints
# ---------------------------------------------------------------------------------------------------------------

def wide_opt(src, dst, std=0.3, seed=0):
    """The tiny OPT with N(0, std) weights: a random LM whose continuations depend on the prompt."""
    from transformers import AutoTokenizer, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0, std)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src, use_fast=False).save_pretrained(dst)
    return str(dst)


def random_vit(path, seed=1):
    from lavis_pformer.backbones import custom_vit

    torch.manual_seed(seed)
    vit = custom_vit(32, VIT)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            is_norm_weight = ".norm" in name and name.endswith("weight")
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm_weight else 0.3 * torch.randn_like(p))
    torch.save(vit.state_dict(), path)
    return str(path)


def randomise_trainable(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                is_norm_weight = ("LayerNorm.weight" in name or "ln_vision.weight" in name)
                p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm_weight else 0.2 * torch.randn_like(p))


DATA = {"images": {"storage": "world"}, "annotations": {"train": {"storage": "world/captions_train.json"}}}


def make_run(root, llm, llm_dir, bert, vit_path, seed):
    """A stage-2 run's config file and checkpoint (with a stage-1 checkpoint and a P-Former behind it)."""
    from lavis_pformer.pformer import PFormer

    pformer = os.path.join(root, f"pformer_{llm}.pth")
    PFormer.from_bert(bert, NUM_QUERY, LLM_WIDTH[llm], llm_dir).save(pformer)
    stage1 = os.path.join(root, f"stage1_{llm}.pth")
    torch.save({"model": {}, "epoch": 0, "config": {
        "model": {"arch": "blip2_qformer_pformer", "model_type": "tiny", "alignment_weight": 10,
                  "pformer_checkpoint": pformer, "load_pretrained": False},
        "datasets": {"local_caption": {"build_info": DATA}},
        "run": {"task": "image_text_pretrain_pformer"}}}, stage1)
    model_cfg = {
        "arch": f"blip2_{llm}_pformer", "model_type": "tiny", "bert_model": bert, LLM_KEY[llm]: llm_dir,
        "vit_config": dict(VIT, checkpoint=vit_path), "image_size": 32, "num_query_token": NUM_QUERY,
        "alignment_weight": 100, "pformer_checkpoint": pformer, "load_pretrained": True, "pretrained": stage1,
    }
    model = build_model(model_cfg["arch"], "tiny", **lavis_keys(model_cfg), load_pretrained=False)
    randomise_trainable(model, seed)
    run = {"model": model_cfg,
           "datasets": {"local_caption": {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32},
                                                            "eval": {"name": "blip_image_eval", "image_size": 32}},
                                          "build_info": DATA}},
           "run": {"task": "image_text_pretrain_pformer", "output_dir": "out", "max_len": 30}}
    checkpoint = os.path.join(root, f"stage2_{llm}.pth")
    torch.save({"model": model.state_dict(), "config": run, "epoch": 1}, checkpoint)
    cfg_path = os.path.join(root, f"stage2_{llm}.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(run, f)
    return {"cfg": cfg_path, "checkpoint": checkpoint, "model_cfg": model_cfg, "pformer": pformer, "stage1": stage1}


def lavis_keys(model_cfg):
    return {k: v for k, v in model_cfg.items() if k not in ("arch", "model_type", "pretrained", "load_pretrained")}


@contextlib.contextmanager
def first_input(module):
    """The first positional input of ``module`` inside the block (the token ids LAVIS embeds)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) if not seen else None)
    try:
        yield seen
    finally:
        handle.remove()


def lavis_reference(run, llm, pixels):
    """What LAVIS computes with the checkpoint loaded as an evaluation run loads it."""
    from lavis_pformer.models.alignment import capture_first_output

    cfg = run["model_cfg"]
    model = build_model(cfg["arch"], "tiny", **lavis_keys(cfg), load_finetuned=True, finetuned=run["checkpoint"])
    model.eval()
    out = {}
    if llm == "opt":
        samples = {"image": pixels, "text_input": ["a red circle left of a blue square"]}
        lm, embed = model.opt_model, model.opt_model.model.decoder.embed_tokens
    else:
        samples = {"image": pixels, "text_input": ["a red circle"], "text_output": ["left of a blue square"]}
        lm, embed = model.t5_model, model.t5_model.encoder.embed_tokens
    with torch.no_grad():
        with capture_first_output(lm) as outputs, first_input(embed) as ids:
            model(samples)
        out["logits"], out["input_ids"] = outputs[0].logits, ids[0]
        out["captions"] = [model.generate({"image": pixels, "prompt": p or ""}, num_beams=1, max_length=MAX_NEW_TOKENS,
                                          min_length=1)[0].strip() for p in CAPTION_PROMPTS[llm]]
        batch = {"image": pixels.expand(len(QUESTIONS), -1, -1, -1)}
        out["answers"] = {str(beams): model.predict_answers(dict(batch, text_input=list(QUESTIONS)), num_beams=beams,
                                                            max_len=VQA_MAX_LEN, min_len=1, prompt=QA_PROMPT,
                                                            length_penalty=-1)
                          for beams in (1, 5)}
    return model, out


@pytest.fixture(scope="module")
def exported(tiny, hf_site, tmp_path_factory):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from lavis_pformer.export_hf import cli as export_hf

    root = str(tmp_path_factory.mktemp("export_hf"))
    llm_dirs = {"opt": wide_opt(tiny["opt"], os.path.join(root, "opt")), "t5": tiny["t5"]}
    vit_path = random_vit(os.path.join(root, "vit.pth"))
    rng = np.random.RandomState(0)
    image_path = os.path.join(root, "image.png")
    Image.fromarray((rng.rand(48, 40, 3) * 255).astype("uint8")).save(image_path)  # resized to 32 px by both
    lavis_processor = BlipImageEvalProcessor(image_size=32)
    pixels = lavis_processor(Image.open(image_path).convert("RGB")).unsqueeze(0)
    pixels_path = os.path.join(root, "pixels.pt")
    torch.save(pixels, pixels_path)

    snippet_image = os.path.join(root, "image32.png")  # at the model's size: both resize backends agree
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(snippet_image)
    snippet_pixels = lavis_processor(Image.open(snippet_image).convert("RGB")).unsqueeze(0)

    runs = {llm: make_run(root, llm, llm_dirs[llm], tiny["bert"], vit_path, seed=i)
            for i, llm in enumerate(("opt", "t5"))}
    folders = {llm: os.path.join(root, f"hf_{llm}") for llm in runs}
    # OPT through the command line (as documented), T5 in-process with small shards (index file path).
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lavis_pformer.export_hf", "--cfg-path", runs["opt"]["cfg"],
                           "--checkpoint", runs["opt"]["checkpoint"], "--out", folders["opt"]],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert export_hf.main(["--cfg-path", runs["t5"]["cfg"], "--checkpoint", runs["t5"]["checkpoint"],
                           "--out", folders["t5"], "--max-shard-size", "150KB"]) == 0
    folders["opt_bf16"] = os.path.join(root, "hf_opt_bf16")
    assert export_hf.main(["--cfg-path", runs["opt"]["cfg"], "--checkpoint", runs["opt"]["checkpoint"],
                           "--out", folders["opt_bf16"], "--dtype", "bf16"]) == 0

    models, lavis = {}, {}
    for llm in runs:
        models[llm], lavis[llm] = lavis_reference(runs[llm], llm, pixels)
        with torch.no_grad():  # what the model card's snippet should print: the model's caption, LAVIS's defaults
            lavis[llm]["snippet_caption"] = models[llm].generate({"image": snippet_pixels}, num_beams=1, max_length=30,
                                                                 min_length=1)[0].strip()
    jobs = {llm: {
        "folder": folders[llm], "pixels": pixels_path, "image": image_path,
        "logits_text": "a red circle left of a blue square\n" if llm == "opt" else "a red circle",
        "logits_labels": None if llm == "opt" else "left of a blue square",
        "caption_prompts": CAPTION_PROMPTS[llm], "max_new_tokens": MAX_NEW_TOKENS, "questions": QUESTIONS,
        "vqa_prompt": QA_PROMPT, "vqa_beams": [1, 5], "vqa_max_len": VQA_MAX_LEN, "vqa_length_penalty": -1,
        "snippet_image": snippet_image,
    } for llm in runs}
    jobs["opt_bf16"] = dict(jobs["opt"], folder=folders["opt_bf16"], caption_prompts=[], vqa_beams=[], snippet_image=None)
    hf = run_hf_side(hf_site, {"jobs": jobs}, root)
    summaries = {}
    for name, folder in folders.items():
        with open(os.path.join(folder, "export_provenance.json")) as f:
            summaries[name] = json.load(f)
    return {"root": root, "runs": runs, "folders": folders, "models": models, "lavis": lavis, "hf": hf["jobs"],
            "hf_versions": (hf["transformers_version"], hf["torch_version"]), "summaries": summaries,
            "pixels": pixels, "lavis_processor": lavis_processor, "image": image_path}


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["opt", "t5", "opt_bf16"])
def test_transformers_loads_every_tensor(exported, name):
    hf = exported["hf"][name]
    assert exported["hf_versions"][0] == "5.25.0"
    assert hf["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert hf["image_processor"] == "BlipImageProcessor" and hf["num_query_tokens"] == NUM_QUERY
    assert hf["image_token_id"] == hf["tokenizer_image_token_id"] == exported["summaries"][name]["image_token_id"]
    assert hf["dtype"] == ("torch.bfloat16" if name.endswith("bf16") else "torch.float32")


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_same_logits_for_same_image_and_text(exported, llm):
    lavis, hf = exported["lavis"][llm], exported["hf"][llm]
    ids = hf["logits_input_ids"][0].tolist()
    # Blip2Processor's sequence is LAVIS's: Q image positions, then exactly the tokens LAVIS embeds.
    assert ids[:NUM_QUERY] == [hf["image_token_id"]] * NUM_QUERY
    assert ids[NUM_QUERY:] == lavis["input_ids"][0].tolist()
    vocab = lavis["logits"].shape[-1]
    assert hf["logits"].shape[-1] == vocab + exported["summaries"][llm]["added_vocab_rows"]
    assert hf["logits"].shape[:-1] == lavis["logits"].shape[:-1]
    assert lavis["logits"].std() > 0.1  # not a near-constant output that would agree by accident
    diff = (hf["logits"][..., :vocab] - lavis["logits"]).abs().max().item()
    print(f"\n{llm}: max |logit difference| {diff:.2e} (logits up to {lavis['logits'].abs().max():.1f})")
    assert diff <= LOGIT_TOLERANCE


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_same_greedy_captions(exported, llm):
    lavis, hf = exported["lavis"][llm]["captions"], exported["hf"][llm]["captions"]
    assert all(lavis), lavis  # non-empty, so that equality means something
    assert hf == lavis


@pytest.mark.parametrize("llm", ["opt", "t5"])
@pytest.mark.parametrize("beams", ["1", "5"])
def test_same_vqa_answers(exported, llm, beams):
    """LAVIS's predict_answers (prompt "Question: {} Short answer:", length_penalty -1) vs generate on the export."""
    lavis, hf = exported["lavis"][llm]["answers"][beams], exported["hf"][llm]["answers"][beams]
    assert len(set(lavis)) >= 3, lavis  # the answers depend on the question
    assert hf == lavis


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_model_card_snippet_prints_the_lavis_caption(exported, llm):
    """The README's few lines, run as written (default processor, the folder's generation_config)."""
    printed = exported["hf"][llm]["snippet_output"].strip()
    caption = exported["lavis"][llm]["snippet_caption"]
    assert caption
    assert [c.strip() for c in ast.literal_eval(printed)] == [caption], printed  # it prints a list of strings


def test_image_processor_matches_lavis_eval_processor(exported):
    lavis = exported["pixels"]
    hf = exported["hf"]["opt"]
    assert hf["pixels_pil"].shape == lavis.shape
    assert (hf["pixels_pil"] - lavis).abs().max() <= 1e-6  # PIL backend: LAVIS's resize, exactly
    # transformers' default (torchvision) backend resizes the tensor: close, not identical (the image is resized).
    assert (hf["pixels_default"] - lavis).abs().max() <= 0.05
    with open(os.path.join(exported["folders"]["opt"], "preprocessor_config.json")) as f:
        config = json.load(f)
    normalize = exported["lavis_processor"].normalize
    assert config["image_mean"] == pytest.approx(list(normalize.mean))
    assert config["image_std"] == pytest.approx(list(normalize.std))
    assert config["size"] == {"height": 32, "width": 32} and config["resample"] == 3


# ---------------------------------------------------------------------------------------------------------------
# The folder and its model card
# ---------------------------------------------------------------------------------------------------------------

def safetensors_names(folder):
    names = []
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with open(os.path.join(folder, file), "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


def test_folder_contents(exported):
    opt, t5 = exported["folders"]["opt"], exported["folders"]["t5"]
    for folder in (opt, t5):
        for file in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                     "tokenizer_config.json", "README.md", "export_provenance.json"):
            assert os.path.isfile(os.path.join(folder, file)), file
        names = safetensors_names(folder)
        assert not [n for n in names if "pformer" in n.lower()]  # the teacher is not exported
        assert "vision_model.post_layernorm.weight" in names and "language_projection.weight" in names
    assert os.listdir(opt).count("model.safetensors") == 1
    with open(os.path.join(t5, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(f for f in os.listdir(t5) if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    with open(os.path.join(opt, "config.json")) as f:
        config = json.load(f)
    assert config["num_query_tokens"] == NUM_QUERY and config["vision_config"]["intermediate_size"] == int(32 * 4.3637)
    with open(os.path.join(opt, "generation_config.json")) as f:
        generation = json.load(f)
    newline = exported["models"]["opt"].eos_token_id
    assert generation["eos_token_id"] == config["text_config"]["eos_token_id"] == newline  # LAVIS stops at "\n"


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_model_card_provenance(exported, llm):
    run = exported["runs"][llm]
    with open(os.path.join(exported["folders"][llm], "README.md")) as f:
        card = f.read()
    with open(run["pformer"], "rb") as f:
        pformer_sha = hashlib.sha256(f.read()).hexdigest()
    with open(run["checkpoint"], "rb") as f:
        checkpoint_sha = hashlib.sha256(f.read()).hexdigest()
    assert pformer_sha in card and checkpoint_sha in card
    rows = [line for line in card.splitlines() if line.startswith("| stage ") and not line.startswith("| stage |")]
    assert len(rows) == 2 and "stage 2" in rows[0] and "| 100 |" in rows[0]
    assert "stage 1" in rows[1] and "| 10 |" in rows[1] and "world/captions_train.json" in rows[1]
    assert "local_caption" in rows[0] and "not part of this folder" in card
    stages = exported["summaries"][llm]["provenance"]
    assert [s["alignment_weight"] for s in stages] == [100, 10]
    assert {s["pformer"]["sha256"] for s in stages} == {pformer_sha}


# ---------------------------------------------------------------------------------------------------------------
# What cannot be exported faithfully is refused
# ---------------------------------------------------------------------------------------------------------------

def test_refuses_vits_that_blip2_vision_model_cannot_express(exported):
    from lavis_pformer.export_hf import ExportError
    from lavis_pformer.export_hf.mapping import vision_part

    model = exported["models"]["opt"]
    with pytest.raises(ExportError, match="clip_L"):
        vision_part(model, "clip_L")
    scaled = copy.deepcopy(model)
    scaled.visual_encoder.blocks[1].gamma_1 = nn.Parameter(torch.ones(VIT["embed_dim"]))
    with pytest.raises(ExportError, match="block 1: layer scale"):
        vision_part(scaled, "custom_vit")
    no_bias = copy.deepcopy(model)
    no_bias.visual_encoder.blocks[0].attn.q_bias = None
    with pytest.raises(ExportError, match="without q/v bias"):
        vision_part(no_bias, "custom_vit")


def test_refuses_qformers_that_blip2_qformer_cannot_express(exported):
    from lavis_pformer.export_hf import ExportError
    from lavis_pformer.export_hf.mapping import qformer_part

    model = exported["models"]["t5"]
    relative = copy.deepcopy(model)
    relative.Qformer.bert.config.position_embedding_type = "relative_key"
    with pytest.raises(ExportError, match="relative_key"):
        qformer_part(relative, VIT["embed_dim"])
    irregular = copy.deepcopy(model)  # cross-attention in layer 1 only: not every k layers from layer 0
    layer0, layer1 = irregular.Qformer.bert.encoder.layer
    assert layer0.has_cross_attention and layer1.has_cross_attention  # the tiny type's cross_attention_freq 1
    del layer0.crossattention
    layer0.has_cross_attention = False
    with pytest.raises(ExportError, match=r"cross-attention in layers \[1\]"):
        qformer_part(irregular, VIT["embed_dim"])


def test_refuses_eval_processors_blip_image_processor_cannot_express():
    from lavis_pformer.export_hf import ExportError
    from lavis_pformer.export_hf.processors import image_processor_config

    def run_cfg(eval_cfg):
        return OmegaConf.create({"datasets": {"coco_caption": {"vis_processor": {"eval": eval_cfg}}}})

    with pytest.raises(ExportError, match="Resize.*ToTensor.*Normalize only"):
        image_processor_config(run_cfg({"name": "blip2_image_train", "image_size": 32}), None, 32)
    with pytest.raises(ExportError, match="resizes to 64 px but the model's ViT takes 32 px"):
        image_processor_config(run_cfg({"name": "blip_image_eval", "image_size": 64}), None, 32)


def test_cli_errors_are_one_clear_line(exported, tmp_path, capsys):
    from lavis_pformer.export_hf.cli import main

    run = exported["runs"]["opt"]
    assert main(["--cfg-path", run["cfg"], "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "export_hf: error: --checkpoint: no file at" in capsys.readouterr().err
    assert main(["--cfg-path", run["cfg"], "--checkpoint", run["checkpoint"], "--out", exported["folders"]["opt"]]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text(yaml.safe_dump({"model": {"arch": "blip2_qformer_pformer", "model_type": "tiny"}}))
    assert main(["--cfg-path", str(stage1), "--checkpoint", run["stage1"], "--out", str(tmp_path / "o")]) == 2
    assert "not an image-to-text BLIP-2 with an LLM" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exports_a_stock_lavis_checkpoint_under_the_plugin_arch(exported, tmp_path):
    """A checkpoint written by stock LAVIS blip2_opt (same tensors) exports with the plugin's config."""
    from lavis_pformer.export_hf.cli import main

    run = exported["runs"]["opt"]
    checkpoint = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    stock = tmp_path / "stock.pth"
    torch.save({"model": checkpoint["model"], "config": {"model": {"arch": "blip2_opt", "model_type": "pretrain_opt2.7b"},
                                                         "run": {"task": "captioning"}}}, stock)
    assert main(["--cfg-path", run["cfg"], "--checkpoint", str(stock), "--out", str(tmp_path / "hf")]) == 0
    with open(tmp_path / "hf" / "export_provenance.json") as f:
        provenance = json.load(f)["provenance"]
    assert provenance[0]["arch"] == "blip2_opt" and provenance[0]["stage"] == "caption fine-tuning"
    assert sorted(safetensors_names(tmp_path / "hf")) == sorted(safetensors_names(exported["folders"]["opt"]))
