"""VQA accuracy of the demo per question type, with LAVIS's answer normalisation: the one scorer of the frozen
LM's text ceiling (``train_lm``) and of the image-side runs (``report``).

The world's ground truth has 10 identical answers, so the VQA score of a question is 1 for a match and 0
otherwise; the overall figure equals LAVIS's ``agg_metrics``/100.
"""
from lavis_pformer.synthetic.shapes_world import QUESTION_TYPES

HEADLINE_TYPES = ("color", "shape", "count")

_VQA_EVAL = None


def normalize_answer(answer):
    """LAVIS's VQA answer normalisation (punctuation, number words -> digits, articles)."""
    global _VQA_EVAL
    if _VQA_EVAL is None:
        try:
            from lavis.common.vqa_tools.vqa_eval import VQAEval

            _VQA_EVAL = VQAEval()
        except Exception:  # pragma: no cover - LAVIS missing: a plain fallback
            _VQA_EVAL = False
    text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
    if _VQA_EVAL:
        text = _VQA_EVAL.processDigitArticle(_VQA_EVAL.processPunctuation(text))
    return text.strip()


def score_answers(answers, answer_sets):
    """Metrics of ``answers``, an iterable of (question_type, prediction, ground truth).

    ``answer_sets``: {question_type: [answers]}. Returns {"overall", "overall_excl_yesno", "on_type",
    "on_type_excl_yesno", "questions", "per_type": {type: {"accuracy", "restricted_accuracy", "on_type",
    "questions"}}}: ``on_type`` is the share of predictions inside their type's answer set, ``restricted_accuracy``
    the accuracy among those (None when there are none); ``overall_excl_yesno`` pools ``HEADLINE_TYPES``.
    """
    sets = {t: {normalize_answer(a) for a in v} for t, v in answer_sets.items()}
    per = {}
    for t, prediction, truth in answers:
        p = normalize_answer(prediction)
        d = per.setdefault(t, {"n": 0, "hit": 0, "on": 0, "on_hit": 0})
        hit = p == normalize_answer(truth)
        on = p in sets.get(t, ())
        d["n"] += 1
        d["hit"] += hit
        d["on"] += on
        d["on_hit"] += hit and on
    out = {"per_type": {}}
    for t in [t for t in QUESTION_TYPES if t in per] + [t for t in per if t not in QUESTION_TYPES]:
        d = per[t]
        out["per_type"][t] = {
            "accuracy": d["hit"] / d["n"],
            "restricted_accuracy": d["on_hit"] / d["on"] if d["on"] else None,
            "on_type": d["on"] / d["n"],
            "questions": d["n"],
        }

    def pooled(types, key):
        ds = [per[t] for t in types if t in per]
        n = sum(d["n"] for d in ds)
        return sum(d[key] for d in ds) / n if n else None

    out["overall"] = pooled(list(per), "hit")
    out["overall_excl_yesno"] = pooled(HEADLINE_TYPES, "hit")
    out["on_type"] = pooled(list(per), "on")
    out["on_type_excl_yesno"] = pooled(HEADLINE_TYPES, "on")
    out["questions"] = sum(d["n"] for d in per.values())
    return out


def vqa_type_metrics(predictions, items, answer_sets):
    """``score_answers`` of ``predictions`` ([{question_id, answer}]) on ``items`` ([{question_id, answer,
    question_type}], the answer a string or a list whose first element counts); a missing prediction is ""."""
    pred = {int(p["question_id"]): p["answer"] for p in predictions}
    return score_answers(
        ((it["question_type"], pred.get(int(it["question_id"]), ""),
          it["answer"][0] if isinstance(it["answer"], list) else it["answer"]) for it in items),
        answer_sets)
