"""Stage 0 (pformer_opt, pformer_t5) on tiny local backbones."""
import copy
import random

import pytest
import torch

from lavis_pformer.pformer import PFormer

from helpers import build_model, tiny_stage0_overrides

SENTENCES = [
    "a red circle on the left and a blue square at the top.",
    "a green triangle in the middle.",
    "two yellow stars next to a black car on the street near a tree.",
    "a dog.",
    "a white cat sitting on a table next to a small gray bird.",
    "three purple squares and one orange circle.",
]


@pytest.fixture(scope="module")
def opt_model(tiny):
    torch.manual_seed(0)
    return build_model("pformer_opt", "pformer_opt2.7b", **tiny_stage0_overrides(tiny, "opt"))


@pytest.fixture(scope="module")
def t5_model(tiny):
    torch.manual_seed(0)
    return build_model("pformer_t5", "pformer_flant5xl", **tiny_stage0_overrides(tiny, "t5"))


def test_prompt_shape_uses_q_not_text_length(opt_model):
    prompt = opt_model.prompt(SENTENCES)
    tokens = opt_model.tokenize(SENTENCES)
    assert tokens.input_ids.shape[1] != 4
    assert prompt.shape == (len(SENTENCES), 4, opt_model.opt_model.config.hidden_size)


@pytest.mark.parametrize("name", ["opt_model", "t5_model"])
def test_gradients_reach_pformer_only_and_llm_is_unchanged(name, request):
    model = copy.deepcopy(request.getfixturevalue(name))
    model.train()
    llm = model.llm_module()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in {id(q) for q in model.pformer.parameters()} for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    out = model({"text_input": SENTENCES})
    for key, value in out.items():
        assert torch.isfinite(value), key
    out["loss"].backward()
    assert all(p.grad is None for p in llm.parameters())
    assert model.pformer.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.pformer.llm_proj.weight.grad.abs().sum() > 0
    assert model.pformer.text_proj.weight.grad.abs().sum() > 0
    optimizer.step()
    after = llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert llm.training  # llm_train_mode (default): frozen, but its dropout follows model.train()


@pytest.mark.parametrize("llm, train_mode", [("opt", True), ("opt", False), ("t5", True), ("t5", False)])
def test_llm_mode_in_stage0(tiny, llm, train_mode):
    """Default (like the reference): model.train() puts the frozen LLM in train mode, its dropout active, so
    the reconstruction loss of a fixed prompt varies from call to call; llm_train_mode: False keeps it in eval."""
    arch, model_type = {"opt": ("pformer_opt", "pformer_opt2.7b"), "t5": ("pformer_t5", "pformer_flant5xl")}[llm]
    overrides = {} if train_mode else {"llm_train_mode": False}
    torch.manual_seed(0)
    model = build_model(arch, model_type, **tiny_stage0_overrides(tiny, llm, **overrides))
    assert model.llm_train_mode is train_mode
    llm_module = model.llm_module()
    assert not llm_module.training  # built frozen and in eval mode
    model.train()
    rate = llm_module.config.dropout if llm == "opt" else llm_module.config.dropout_rate
    assert rate > 0 and all(m.training is train_mode for m in llm_module.modules())
    prompt = torch.randn(2, 4, llm_module.config.hidden_size if llm == "opt" else llm_module.config.d_model)
    if llm == "t5":
        model.rng = random.Random(0)
        first = model.llm_loss(prompt, ["a red circle on the left", "two blue squares"])
        model.rng = random.Random(0)
    else:
        first = model.llm_loss(prompt, ["a red circle on the left", "two blue squares"])
    second = model.llm_loss(prompt, ["a red circle on the left", "two blue squares"])
    assert (not torch.equal(first, second)) is train_mode
    model.eval()
    assert not llm_module.training
    assert all(p.requires_grad is False for p in llm_module.parameters())


def test_opt_loss_terms_and_total_falls(opt_model):
    model = copy.deepcopy(opt_model)
    model.train()
    assert set(model({"text_input": SENTENCES})) == {"loss", "loss_lm", "loss_c", "loss_vq"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        out = model({"text_input": SENTENCES})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_t5_losses_and_one_word_sentences(t5_model):
    model = copy.deepcopy(t5_model)
    model.train()
    long = " ".join(["word"] * 30)
    out = model({"text_input": ["dog", "red circle", long]})
    assert set(out) == {"loss", "loss_lm", "loss_c"}  # VQ off by default for T5
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_t5_stage0_split_uses_the_stage0_distribution(t5_model):
    model = copy.deepcopy(t5_model)
    model.rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(10))
    lengths = set()
    for _ in range(300):
        prefix, suffix = model.split(text)
        assert (prefix + " " + suffix).split() == text.split()
        lengths.add(len(prefix.split()))
    assert lengths == set(range(1, 7))  # 1 .. 1 + 10 // 2
    assert model.split("dog") == ("dog", "")


def test_export_reloads_with_identical_outputs(opt_model, tmp_path):
    model = copy.deepcopy(opt_model).eval()
    path = model.export_checkpoint(str(tmp_path))
    teacher = PFormer.load(path, num_query_token=4, llm_hidden_size=model.opt_model.config.hidden_size,
                           llm_name=model.llm_name).eval()
    tokens = model.tokenize(SENTENCES)
    with torch.no_grad():
        expected = model.pformer(tokens.input_ids, tokens.attention_mask)
        got = teacher(tokens.input_ids, tokens.attention_mask)
    assert torch.equal(expected.prompt, got.prompt)
    assert torch.equal(expected.text_feat, got.text_feat)


def test_state_dict_holds_no_llm_tensor(opt_model, t5_model):
    assert not [k for k in opt_model.state_dict() if k.startswith("opt_model.")]
    assert not [k for k in t5_model.state_dict() if k.startswith("t5_model.")]
    assert any(k.startswith("pformer.") for k in opt_model.state_dict())


def test_generate_reconstructs_strings(opt_model, t5_model):
    for model in (opt_model, t5_model):
        out = model.eval().generate({"text_input": SENTENCES[:2]}, max_length=5)
        assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_weight_given_as_string_is_rejected(tiny):
    with pytest.raises(ValueError, match="vq_weight must be a number"):
        build_model("pformer_opt", "pformer_opt2.7b", **tiny_stage0_overrides(tiny, "opt", vq_weight="1,"))


QA = {"question": ["what color is the circle", "how many objects are there"], "answer": ["red", "2"]}


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_optional_qa_term(llm, tiny):
    arch, model_type = {"opt": ("pformer_opt", "pformer_opt2.7b"), "t5": ("pformer_t5", "pformer_flant5xl")}[llm]
    model = build_model(arch, model_type, **tiny_stage0_overrides(tiny, llm, qa_weight=2.0)).train()
    captions = ["a red circle at the top left.", "a red circle and a blue square."]
    out = model({"text_input": captions, **QA})
    assert "loss_qa" in out and torch.isfinite(out["loss_qa"]) and out["loss_qa"] > 0
    out["loss_qa"].backward()
    assert model.pformer.llm_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm_module().parameters())
    with pytest.raises(ValueError, match="qa_weight > 0 needs"):
        model({"text_input": captions})


def test_qa_loss_scores_only_the_answer(opt_model):
    model = copy.deepcopy(opt_model).eval()
    prompt = model.prompt(["a red circle."])
    question = [model.qa_prompt.format("what color is the circle")]
    base = model.llm_qa_loss(prompt, question, ["red"])
    other_question = [model.qa_prompt.format("what shape is the red object")]
    # same answer, different question: the loss changes only through the context, and a longer answer
    # adds terms: both values are finite and differ from a loss over the whole text
    assert torch.isfinite(base) and torch.isfinite(model.llm_qa_loss(prompt, other_question, ["red"]))
    whole = model.llm_loss(prompt, [question[0] + " red"])
    assert not torch.isclose(base, whole)


def test_corpus_passes_qa_fields_through(tmp_path):
    import json

    import lavis_pformer  # noqa: F401
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"caption": "A red circle.", "question": "What color is the circle?", "answer": "red"},
        {"caption": "A blue square.", "question": "What shape is it?", "answer": "square"},
    ]))
    cfg = OmegaConf.create({"build_info": {"annotations": {"train": {"storage": str(path)}}}})
    dataset = registry.get_builder_class("sentence_corpus")(cfg).build_datasets()["train"]
    batch = dataset.collater([dataset[0], dataset[1]])
    assert batch["question"] == ["what color is the circle?", "what shape is it?"]  # as LAVIS's blip_question
    assert batch["answer"] == ["red", "square"] and batch["text_input"][0] == "a red circle"
