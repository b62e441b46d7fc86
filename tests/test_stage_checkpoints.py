"""Stage 1 -> stage 2 -> evaluation: no trained tensor is dropped silently, checkpoints say what they were
aligned to, the next stage refuses a mismatch, a random frozen custom_vit travels in the checkpoint, and the
tiny model types find their backbones from any folder (issue: no silent losses)."""
import os

import pytest
import torch
from omegaconf import OmegaConf

import lavis_pformer  # noqa: F401
from lavis.common.registry import registry
from lavis_pformer.errors import CheckpointError, MissingFileError
from lavis_pformer.tiny import SIZES

from helpers import REPO, TINY_T5_WIDTH, build_runner, make_teacher, run_section, tiny_workdir

STAGE1, OPT, T5 = "blip2_qformer_pformer", "blip2_opt_pformer", "blip2_t5_pformer"
VIT = SIZES["vit"]
RECORD = "_extra_state"
pytestmark = pytest.mark.usefixtures("process_group")  # a 1-rank gloo group (conftest.py)


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    paths = {llm: make_teacher(tiny, d / f"{llm}.pth", llm) for llm in ("opt", "t5")}
    # A P-Former for another LLM as wide as the tiny T5 (as OPT-6.7B and Flan-T5-XXL are both 4096 wide).
    from lavis_pformer.pformer import PFormer

    torch.manual_seed(0)
    PFormer.from_bert(tiny["bert"], 4, TINY_T5_WIDTH, str(d / "another_llm"), embed_dim=16).save(str(d / "other.pth"))
    paths["other_llm_width_40"] = str(d / "other.pth")
    return paths


def build(tiny, name, seed=0, for_training=True, vit_checkpoint=None, **overrides):
    cfg = dict(bert_model=tiny["bert"], vit_model="custom_vit", image_size=32, vit_precision="fp32",
               llm_precision="fp32", num_query_token=4, max_txt_len=24, load_pretrained=False,
               vit_config=dict(VIT, **({"checkpoint": vit_checkpoint} if vit_checkpoint else {})))
    if name == OPT:
        cfg["opt_model"] = tiny["opt"]
    if name == T5:
        cfg["t5_model"] = tiny["t5"]
    if name == STAGE1:
        cfg["embed_dim"] = 16
    cfg.update(overrides)
    torch.manual_seed(seed)
    return registry.get_model_class(name).from_config(OmegaConf.create(cfg), for_training=for_training)


def save_like_lavis(model, path):
    """What LAVIS's runner writes (runner_base._save_checkpoint): state_dict() less the frozen parameters."""
    trainable = {k: p.requires_grad for k, p in model.named_parameters()}
    torch.save({"model": {k: v for k, v in model.state_dict().items() if trainable.get(k, True)}}, path)
    return str(path)


def strip_record(path, out):
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"].pop(RECORD)
    torch.save(checkpoint, out)
    return str(out)


# --- cross_attention_freq: stage 2 builds the stage-1 Q-Former, or refuses -------------------------------

@pytest.mark.parametrize("name, llm", [(OPT, "opt"), (T5, "t5")])
def test_stage2_builds_the_q_former_stage1_trained(tiny, teachers, tmp_path, name, llm):
    stage1 = build(tiny, STAGE1, cross_attention_freq=1, pformer_checkpoint=teachers[llm])
    path = save_like_lavis(stage1, tmp_path / "stage1.pth")
    stage2 = build(tiny, name, seed=1, cross_attention_freq=1, pformer_checkpoint=teachers[llm],
                   load_pretrained=True, pretrained=path)
    assert stage2.Qformer.config.cross_attention_freq == 1
    own = stage2.state_dict()
    trained = {k: v for k, v in stage1.state_dict().items() if k.startswith("Qformer.bert.encoder.") and k in own}
    assert {k for k in trained if ".layer.1.crossattention." in k}  # the layer stage 2 used to drop
    for key, value in trained.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def test_dropping_trained_tensors_is_an_error_naming_the_config_key(tiny, teachers, tmp_path):
    stage1 = build(tiny, STAGE1, cross_attention_freq=1, pformer_checkpoint=teachers["opt"])
    path = save_like_lavis(stage1, tmp_path / "stage1.pth")
    with pytest.raises(CheckpointError, match=r"cross_attention_freq: the checkpoint has 1, this model 2; "
                                              r"set model.cross_attention_freq: 1"):
        build(tiny, OPT, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=path)
    # a checkpoint without the record (stock LAVIS, older runs): the tensors themselves are checked
    bare = strip_record(path, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError) as err:
        build(tiny, OPT, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=bare)
    message = str(err.value)
    assert "cross-attention in layers [0, 1] but this model (model.cross_attention_freq: 2) builds it in layers [0]"\
        in message
    assert "10 trained tensors would be dropped" in message and "Set model.cross_attention_freq: 1" in message
    # the other way round: layers that stage 2 would start untrained
    stage1_freq2 = build(tiny, STAGE1, cross_attention_freq=2, pformer_checkpoint=teachers["opt"])
    bare2 = strip_record(save_like_lavis(stage1_freq2, tmp_path / "freq2.pth"), tmp_path / "bare2.pth")
    with pytest.raises(CheckpointError, match=r"layer\(s\) would start with untrained cross-attention\. "
                                              r"Set model.cross_attention_freq: 2"):
        build(tiny, OPT, cross_attention_freq=1, pformer_checkpoint=teachers["opt"], load_pretrained=True,
              pretrained=bare2)
    # any other tensor without a place in the model
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["itm_head_v2.weight"] = torch.zeros(2, 64)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 tensors have no place in Blip2OPTPFormer .*itm_head_v2\.weight"):
        build(tiny, OPT, cross_attention_freq=1, pformer_checkpoint=teachers["opt"], load_pretrained=True,
              pretrained=str(tmp_path / "extra.pth"))


def test_tiny_model_types_of_stages_1_and_2_share_cross_attention_freq():
    freqs = {}
    for name in (STAGE1, OPT, T5):
        path = registry.get_model_class(name).default_config_path("tiny")
        freqs[name] = OmegaConf.load(path).model.get("cross_attention_freq", 2)
    assert len(set(freqs.values())) == 1, freqs
    for stage in ("stage1", "stage2"):
        for llm in ("opt", "t5"):
            cfg = OmegaConf.load(os.path.join(REPO, f"projects/pformer/tiny/pretrain_{stage}_{llm}.yaml"))
            assert "cross_attention_freq" not in cfg.model  # the model types' value, the same in both stages


# --- what a checkpoint was aligned to ------------------------------------------------------------------------

def test_checkpoints_record_alignment_q_former_and_llm(tiny, teachers, tmp_path):
    stage1 = build(tiny, STAGE1, pformer_checkpoint=teachers["opt"])
    record = stage1.state_dict()[RECORD]
    assert record["aligned_to"] == {"llm_name": tiny["opt"], "llm_hidden_size": 48, "num_query_token": 4,
                                    "pformer_checkpoint": teachers["opt"]}
    assert record["qformer"] == {"num_query_token": 4, "cross_attention_freq": 2, "num_hidden_layers": 2,
                                 "hidden_size": 64, "encoder_width": 32}
    assert record["llm"] is None and record["arch"] == STAGE1
    assert build(tiny, STAGE1, alignment_weight=0).state_dict()[RECORD]["aligned_to"] is None
    # a stage 2 without a teacher of its own keeps what its stage 1 was aligned to, and adds its LLM
    path = save_like_lavis(stage1, tmp_path / "stage1.pth")
    stage2 = build(tiny, OPT, alignment_weight=0, load_pretrained=True, pretrained=path)
    record = stage2.state_dict()[RECORD]
    assert record["aligned_to"]["llm_name"] == tiny["opt"] and record["llm"] == {"name": tiny["opt"], "hidden_size": 48}
    reloaded = torch.load(path, weights_only=True)["model"][RECORD]  # a weights-only checkpoint
    assert reloaded["aligned_to"]["llm_hidden_size"] == 48


def test_next_stage_refuses_another_llm_of_the_same_width(tiny, teachers, tmp_path):
    """The projection width matches (40), the LLM does not: refused, with or without a teacher in stage 2."""
    stage1 = build(tiny, STAGE1, pformer_checkpoint=teachers["other_llm_width_40"])
    assert stage1.llm_proj.out_features == TINY_T5_WIDTH
    path = save_like_lavis(stage1, tmp_path / "stage1.pth")
    for overrides in ({"alignment_weight": 0}, {"pformer_checkpoint": teachers["t5"]}):
        with pytest.raises(CheckpointError, match=r"aligned to a P-Former of the LLM '.*another_llm' \(width 40, Q=4"
                                                  r".*set model.t5_model: .*another_llm"):
            build(tiny, T5, load_pretrained=True, pretrained=path, **overrides)
    with pytest.raises(CheckpointError, match=r"model.pformer_checkpoint .* is one of .*t5'?: use the P-Former it was"):
        build(tiny, STAGE1, pformer_checkpoint=teachers["t5"], load_pretrained=True, pretrained=path)
    with pytest.raises(CheckpointError, match=r"num_query_token: the checkpoint has 4, this model 5; "
                                              r"set model.num_query_token: 4"):
        build(tiny, STAGE1, alignment_weight=0, num_query_token=5, load_pretrained=True, pretrained=path)
    # the matching LLM loads
    same = save_like_lavis(build(tiny, STAGE1, pformer_checkpoint=teachers["t5"]), tmp_path / "t5_stage1.pth")
    assert build(tiny, T5, alignment_weight=0, load_pretrained=True, pretrained=same).t5_proj.out_features == 40


# --- a random frozen custom_vit ----------------------------------------------------------------------------

def _vit(model):
    return {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}


def test_random_frozen_custom_vit_travels_in_the_checkpoint(tiny, teachers, tmp_path):
    # custom_vit from no file (seed 3: the tiny vit.pth is the random ViT of seed 0)
    stage1 = build(tiny, STAGE1, seed=3, pformer_checkpoint=teachers["opt"])
    vit = _vit(stage1)
    path = save_like_lavis(stage1, tmp_path / "stage1.pth")
    assert not [k for k in torch.load(path, weights_only=True)["model"] if k.startswith("visual_encoder.")]
    stage2 = build(tiny, OPT, seed=1, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=path)
    for key, value in _vit(stage2).items():
        torch.testing.assert_close(value, vit[key], rtol=0, atol=0, msg=key)
    # ... and on into evaluation
    stage2_path = save_like_lavis(stage2, tmp_path / "stage2.pth")
    evaluated = build(tiny, OPT, seed=2, for_training=False, load_finetuned=True, finetuned=stage2_path)
    for key, value in _vit(evaluated).items():
        torch.testing.assert_close(value, vit[key], rtol=0, atol=0, msg=key)
    # another ViT than the one a checkpoint was trained with is refused, either way round
    with pytest.raises(CheckpointError, match="randomly initialised custom_vit, saved inside the checkpoint.*remove "
                                              "model.vit_config.checkpoint"):
        build(tiny, OPT, pformer_checkpoint=teachers["opt"], vit_checkpoint=tiny["vit"], load_pretrained=True,
              pretrained=path)
    from_file = save_like_lavis(build(tiny, STAGE1, pformer_checkpoint=teachers["opt"], vit_checkpoint=tiny["vit"]),
                                tmp_path / "from_file.pth")
    with pytest.raises(CheckpointError, match=f"set model.vit_config.checkpoint: {tiny['vit']}"):
        build(tiny, OPT, seed=3, pformer_checkpoint=teachers["opt"], load_pretrained=True, pretrained=from_file)
    assert build(tiny, OPT, pformer_checkpoint=teachers["opt"], vit_checkpoint=tiny["vit"], load_pretrained=True,
                 pretrained=from_file).state_dict()[RECORD]["vit_weights"] is None  # came from a file: not copied


# --- paths of the tiny model types; vit_config of a run -----------------------------------------------------

@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory without output/tiny, and a stand-in for the repository folder."""
    import lavis_pformer.paths as paths

    repo = tmp_path / "repo"
    (repo / "output").mkdir(parents=True)
    monkeypatch.setattr(paths, "REPO_ROOT", str(repo))
    monkeypatch.chdir(tmp_path)
    return repo


def test_tiny_model_types_find_their_backbones_from_any_folder(tiny, elsewhere):
    from lavis.models import load_model_and_preprocess

    with pytest.raises(MissingFileError, match=r"model\.(bert|opt)_model: 'output/tiny/backbones/(bert|opt)' is neither "
                                               r"a model name on the hub nor an existing path.*python -m lavis_pformer"):
        load_model_and_preprocess("pformer_opt", "tiny", is_eval=True)
    os.symlink(os.path.dirname(os.path.dirname(tiny["bert"])), elsewhere / "output" / "tiny")  # as `make tiny`
    model, _, _ = load_model_and_preprocess("pformer_opt", "tiny", is_eval=True)
    assert model.bert_model == str(elsewhere / "output/tiny/backbones/bert")
    model, _, _ = load_model_and_preprocess(OPT, "tiny", is_eval=True)  # also vit_config.checkpoint
    assert model._vit_origin["checkpoint"] == str(elsewhere / "output/tiny/backbones/vit.pth")


def test_a_run_vit_config_replaces_the_model_types(tiny, tmp_path, monkeypatch):
    """The tiny type's vit_config.checkpoint does not leak into a run that sets its own vit_config."""
    workdir = tiny_workdir(tiny, tmp_path)
    cfg = {"model": {"arch": STAGE1, "model_type": "tiny", "alignment_weight": 0, "vit_config": dict(VIT, depth=2)},
           "datasets": {"local_caption": {"build_info": {
               "images": {"storage": tiny["world"]},
               "annotations": {"train": {"storage": os.path.join(tiny["world"], "captions_train.json")}}}}},
           "run": run_section("out", "image_text_pretrain_pformer")}
    model = build_runner(cfg, workdir, monkeypatch)._model
    assert model._vit_origin["checkpoint"] is None and len(model.visual_encoder.blocks) == 2
    del cfg["model"]["vit_config"]  # the model type's, with a key changed on the command line: its file stays
    model = build_runner(cfg, workdir, monkeypatch, options=["model.vit_config.mlp_ratio=4.0"])._model
    assert model._vit_origin["checkpoint"] == os.path.join(workdir, "output/tiny/backbones/vit.pth")
