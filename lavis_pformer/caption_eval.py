"""Offline COCO caption metrics on a local ground-truth file (pycocotools + pycocoevalcap, as LAVIS).

LAVIS's ``coco_caption_eval`` always downloads the Karpathy GT and runs SPICE, which downloads Stanford
CoreNLP at first use; here the GT is a local COCO-format file and SPICE is opt-in.
"""
import logging
import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from lavis_pformer.errors import DataError, SetupError


def require_java():
    if shutil.which("java") is None:
        raise SetupError(
            "caption metrics need a Java runtime (pycocoevalcap's PTB tokenizer and METEOR are Java): "
            "install one (e.g. `apt-get install default-jre-headless`) or set run.report_metric=False"
        )


def caption_metrics(gt_file, result_file, spice=False):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE if asked) of a LAVIS result file against a COCO GT.

    result_file: json list of {"image_id", "caption"}; every GT image needs a prediction.
    Returns {"Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}.
    """
    require_java()
    gt = COCO(gt_file)
    results = gt.loadRes(result_file)
    missing = sorted(set(gt.getImgIds()) - set(results.getImgIds()))
    if missing:
        raise DataError(
            f"{result_file} has no caption for {len(missing)} of the {len(gt.getImgIds())} images in {gt_file} "
            f"(e.g. image_id {missing[:5]}): evaluate the whole split"
        )
    ids = gt.getImgIds()
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: gt.imgToAnns[i] for i in ids})
    preds = tokenizer.tokenize({i: results.imgToAnns[i] for i in ids})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["SPICE"]))
    metrics = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(refs, preds)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            metrics[name] = float(value)
    logging.info("caption metrics on %d images: %s", len(ids), {k: round(v, 4) for k, v in metrics.items()})
    return metrics
