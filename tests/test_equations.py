"""Each loss of the method, computed here directly from its definition on fixed inputs and compared with the
project's function or model output.

    stage 0   loss_lm (OPT)  -1/N sum_b sum_k log p_OPT(x_bk | P_b, x_b<k), x = tokens of caption + "\n"
              loss_lm (T5)   -1/N sum_b sum_k log p_T5(s_bk | enc([P_b ; prefix_b]), s_b<k), s = suffix + </s>
              loss_qa (OPT)  as loss_lm, over the tokens that follow "Question: q Short answer:" only
              loss_c         1/2 [CE_ls(a_i . b_j / t) + CE_ls(b_i . a_j / t)], label smoothing eps
              loss_vq        1/(B Q H) sum ||P_bq - E[argmin_j ||P_bq - E_j||]||^2
    stage 1/2 loss_align     w/(B Q H) sum (proj(queries) - P-Former prompt(caption))^2

Probabilities are read one position at a time: each p(x_k | ...) comes from a separate forward pass of the
frozen LLM on exactly the context that precedes x_k (no batching, no padding, no label shifting), so the
project's batched, padded, shifted computation is checked against the plain definition. The LLMs are in
eval mode (no dropout) for the comparison.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lavis_pformer.losses import alignment_loss, two_view_contrastive_loss, vq_commitment_loss
from lavis_pformer.tiny import SIZES

from helpers import build_model, make_teacher, tiny_stage0_overrides

CAPTIONS = ["a red circle on the left", "two blue squares", "a dog"]
Q = 4


@pytest.fixture(scope="module")
def opt_stage0(tiny):
    torch.manual_seed(0)
    return build_model("pformer_opt", "pformer_opt2.7b", **tiny_stage0_overrides(tiny, "opt")).eval()


@pytest.fixture(scope="module")
def t5_stage0(tiny):
    torch.manual_seed(0)
    return build_model("pformer_t5", "pformer_flant5xl", **tiny_stage0_overrides(tiny, "t5")).eval()


def fixed_prompt(batch, width, seed=0):
    return torch.randn(batch, Q, width, generator=torch.Generator().manual_seed(seed))


def opt_log_prob(opt, prompt_row, context_ids, token):
    """log p(token | [prompt_row ; embed(context_ids)]) from one unpadded forward pass of OPT."""
    embeds = torch.cat([prompt_row, opt.get_input_embeddings()(torch.tensor(context_ids, dtype=torch.long))])
    logits = opt(inputs_embeds=embeds[None], return_dict=True).logits[0, -1]
    return logits.log_softmax(-1)[token].item()


# --- stage 0 --------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_stage0_opt_loss_lm_is_the_token_mean_negative_log_likelihood(opt_stage0):
    model, opt = opt_stage0, opt_stage0.opt_model
    prompt = fixed_prompt(len(CAPTIONS), opt.config.hidden_size)
    terms = []
    for b, caption in enumerate(CAPTIONS):
        ids = model.opt_tokenizer(caption + "\n").input_ids  # [</s>, caption tokens ..., "\n"]
        assert ids[-1] == model.eos_token_id
        terms += [-opt_log_prob(opt, prompt[b], ids[:k], ids[k]) for k in range(len(ids))]
    expected = sum(terms) / len(terms)
    assert model.llm_loss(prompt, CAPTIONS).item() == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_stage0_opt_qa_term_scores_the_answer_tokens_only(opt_stage0):
    model, opt = opt_stage0, opt_stage0.opt_model
    prompt = fixed_prompt(2, opt.config.hidden_size, seed=1)
    questions = [model.qa_prompt.format("what color is the circle"), model.qa_prompt.format("how many")]
    answers = ["red", "two squares"]
    terms = []
    for b, (question, answer) in enumerate(zip(questions, answers)):
        ids = model.opt_tokenizer(f"{question} {answer}\n").input_ids
        start = len(model.opt_tokenizer(question).input_ids)  # the answer (and "\n") follow the question tokens
        terms += [-opt_log_prob(opt, prompt[b], ids[:k], ids[k]) for k in range(start, len(ids))]
    expected = sum(terms) / len(terms)
    assert model.llm_qa_loss(prompt, questions, answers).item() == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_stage0_t5_loss_lm_is_the_suffix_negative_log_likelihood(t5_stage0):
    model, t5 = t5_stage0, t5_stage0.t5_model
    prompt = fixed_prompt(3, t5.config.d_model, seed=2)
    prefixes, suffixes = ["a red", "two blue squares", "a dog"], ["circle on the left", "", ""]
    terms = []
    for b, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        prefix_ids = torch.tensor(model.t5_tokenizer(prefix).input_ids)  # ends with </s>
        encoder_in = torch.cat([prompt[b], t5.encoder.embed_tokens(prefix_ids)])[None]
        target = model.t5_tokenizer(suffix).input_ids  # suffix tokens + </s> (just </s> when empty)
        for k in range(len(target)):
            decoder_in = torch.tensor([[t5.config.decoder_start_token_id] + target[:k]])
            logits = t5(inputs_embeds=encoder_in, decoder_input_ids=decoder_in, return_dict=True).logits[0, -1]
            terms.append(-logits.log_softmax(-1)[target[k]].item())
    expected = sum(terms) / len(terms)
    assert model.seq2seq_loss(prompt, prefixes, suffixes).item() == pytest.approx(expected, rel=1e-5)


def contrastive_by_definition(a, b, t, eps):
    """1/2 (mean_i CE_ls(row i of a.b^T / t) + mean_i CE_ls(row i of b.a^T / t)), in Python floats.

    CE_ls(row i) = -(1 - eps) log p_ii - eps/B sum_j log p_ij,  p_ij = exp(s_ij) / sum_k exp(s_ik)."""
    a, b, n = a.tolist(), b.tolist(), len(a)

    def direction(x, y):
        total = 0.0
        for i in range(n):
            s = [sum(u * v for u, v in zip(x[i], y[j])) / t for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in s))
            log_p = [v - log_z for v in s]
            total += -(1 - eps) * log_p[i] - eps / n * sum(log_p)
        return total / n

    return (direction(a, b) + direction(b, a)) / 2


@pytest.mark.parametrize("t, eps", [(0.07, 0.1), (0.3, 0.0)])
def test_contrastive_loss_matches_its_definition(t, eps):
    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    b = F.normalize(a + 0.3 * torch.randn(5, 6, generator=g), dim=-1)  # a second, perturbed view
    for key_grad in (False, True):  # the value does not depend on where the gradient flows
        got = two_view_contrastive_loss(a, b, torch.tensor(t), label_smoothing=eps, key_grad=key_grad).item()
        assert got == pytest.approx(contrastive_by_definition(a, b, t, eps), rel=1e-5)


def vq_by_definition(prompt, codebook):
    """Mean over all elements of (P - E[nearest row])^2, nearest by squared Euclidean distance, in Python floats."""
    rows, total, count = codebook.tolist(), 0.0, 0
    for vector in prompt.reshape(-1, prompt.size(-1)).tolist():
        distances = [sum((p - e) ** 2 for p, e in zip(vector, row)) for row in rows]
        nearest = rows[distances.index(min(distances))]
        total += sum((p - e) ** 2 for p, e in zip(vector, nearest))
        count += len(vector)
    return total / count


def test_vq_loss_matches_its_definition():
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(40, 6, generator=g)
    prompt = torch.randn(2, 3, 6, generator=g)
    prompt[0, 0] = codebook[7] + 0.01  # one vector right next to a row
    for chunk in (7, 4096):
        got = vq_commitment_loss(prompt, codebook, chunk_size=chunk).item()
        assert got == pytest.approx(vq_by_definition(prompt, codebook), rel=1e-5)


def pformer_prompt_by_hand(pformer, tokenizer, captions, max_len):
    """P(caption) = W2 tanh(W1 reshape_Q(Wq h_cls + bq) + b1) + b2 from the P-Former's weights."""
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    h_cls = pformer.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[:, 0]
    queries = (h_cls @ pformer.query_proj.weight.t() + pformer.query_proj.bias).view(len(captions), Q, -1)
    hidden = torch.tanh(queries @ pformer.prompt_head[0].weight.t() + pformer.prompt_head[0].bias)
    return hidden @ pformer.llm_proj.weight.t() + pformer.llm_proj.bias, h_cls


@torch.no_grad()
def test_stage0_model_terms_match_the_definitions(opt_stage0):
    """In eval mode (no masking, no dropout) the two views coincide: every term of pformer_opt's forward is the
    definition applied to the P-Former's outputs computed by hand."""
    model = opt_stage0
    prompt, h_cls = pformer_prompt_by_hand(model.pformer, model.tokenizer, CAPTIONS, model.max_txt_len)
    feat = F.normalize(h_cls @ model.pformer.text_proj.weight.t() + model.pformer.text_proj.bias, dim=-1)
    out = model({"text_input": CAPTIONS})
    assert out["loss_c"].item() == pytest.approx(
        contrastive_by_definition(feat, feat, model.pformer.temperature().item(), model.label_smoothing), rel=1e-5)
    assert out["loss_vq"].item() == pytest.approx(vq_by_definition(prompt, model.llm_input_embeddings()), rel=1e-5)
    assert out["loss_lm"].item() == pytest.approx(model.llm_loss(prompt, CAPTIONS).item(), rel=1e-5)
    torch.testing.assert_close(out["loss"], out["loss_lm"] + out["loss_c"] + out["loss_vq"])


# --- stages 1 and 2: the alignment loss -------------------------------------------------------------------------

def test_alignment_loss_matches_its_definition():
    g = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    expected = 100 * sum((p - t) ** 2 for p, t in zip(pred.flatten().tolist(), target.flatten().tolist())) / 24
    assert alignment_loss(pred, target, 100.0).item() == pytest.approx(expected, rel=1e-6)


def image_model(tiny, arch, teacher, weight):
    from lavis.common.registry import registry

    cfg = dict(bert_model=tiny["bert"], vit_model="custom_vit", image_size=32, vit_precision="fp32",
               vit_config=SIZES["vit"], llm_precision="fp32",
               num_query_token=Q, max_txt_len=24, load_pretrained=False, alignment_weight=weight,
               pformer_checkpoint=teacher)
    if arch == "blip2_opt_pformer":
        cfg["opt_model"] = tiny["opt"]
    torch.manual_seed(0)
    return registry.get_model_class(arch).from_config(OmegaConf.create(cfg), for_training=True).eval()


@pytest.mark.parametrize("arch, weight", [("blip2_qformer_pformer", 10.0), ("blip2_opt_pformer", 100.0)])
@torch.no_grad()
def test_alignment_term_of_the_models_matches_its_definition(tiny, tmp_path, process_group, arch, weight):
    """loss_align = w * mean((proj(Q-Former query output of the image) - P-Former prompt of the caption)^2),
    with the query output, the projection and the teacher's prompt all recomputed here from the weights."""
    teacher = make_teacher(tiny, tmp_path / "pformer.pth", "opt", num_query_token=Q)
    model = image_model(tiny, arch, teacher, weight)
    image = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    image_embeds = model.ln_vision(model.visual_encoder(image))
    queries = model.Qformer.bert(
        query_embeds=model.query_tokens.expand(3, -1, -1), encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long), return_dict=True,
    ).last_hidden_state[:, :Q]
    proj = model.llm_proj if arch == "blip2_qformer_pformer" else model.opt_proj
    prediction = queries @ proj.weight.t() + proj.bias
    target, _ = pformer_prompt_by_hand(model.pformer_teacher, model.tokenizer, CAPTIONS, model.max_txt_len)
    expected = weight * ((prediction - target) ** 2).sum().item() / prediction.numel()
    out = model({"image": image, "text_input": CAPTIONS})
    assert out["loss_align"].item() == pytest.approx(expected, rel=1e-5)
