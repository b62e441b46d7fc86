"""The paper's tables in miniature, declared as data: the arms each table trains, the metrics it reports and the
paper's claims (which arm beats which, on what, with the paper's own numbers).

An arm is one model of the comparison, named by what it is made of; two tables that name the same arm share its
runs (``plan``). A claim compares two arms on one metric; its direction over the worlds is ``scoring.direction``.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

# Stage-0 text of each teacher: its source in the paper world, the share of the scale's ``stage0.lines`` it keeps
# (None: every line of the source), whether it holds (caption, question, answer) triples for the QA term. Every
# stage 0 runs the same number of steps (its lines are repeated up to ``stage0.lines``), so the teachers differ
# only in the text they read. Labels give the sizes at scale "cpu" (stage0.lines = 32,000; 1000 train pairs).
CORPORA = {
    "sent32k": dict(source="sentences.txt", share=1.0, qa=False, label="32,000 unpaired sentences"),
    "sent4k": dict(source="sentences.txt", share=0.125, qa=False, label="4,000 unpaired sentences"),
    "paired": dict(source="captions_train.json", share=None, qa=False,
                   label="the 1000 paired captions alone (no unpaired text)"),
    "qa32k": dict(source="qa_triples.jsonl", share=1.0, qa=True,
                  label="32,000 unpaired sentences + the text-only QA term (an extension)"),
}


@dataclass(frozen=True)
class Arm:
    """A BLIP-2 model of the comparison: its frozen LLM, its teacher's stage-0 text (None: no teacher), the
    alignment weights of stages 1 and 2, and whether its stage-2 model is then fine-tuned on the paired captions
    with the LM loss alone (the paper's caption fine-tuning)."""

    llm: str = "opt"
    corpus: Optional[str] = None
    w1: int = 0
    w2: int = 0
    finetune: bool = False

    @property
    def name(self):
        base = f"{self.llm}_w{self.w1}_{self.w2}" + (f"_{self.corpus}" if self.teacher else "")
        return base + ("_ft" if self.finetune else "")

    @property
    def teacher(self):
        """The stage-0 run this arm aligns to: (llm, corpus), or None."""
        return (self.llm, self.corpus) if self.corpus and (self.w1 or self.w2) else None

    @property
    def pretrained(self):
        """The arm whose stage-2 model a fine-tuned arm starts from."""
        return Arm(self.llm, self.corpus, self.w1, self.w2) if self.finetune else None


@dataclass(frozen=True)
class VideoArm:
    """An arm of the video table: ``align`` adds the alignment to the P-Former of the video captions."""

    align: bool

    @property
    def name(self):
        return "video_itg_align" if self.align else "video_itg"


@dataclass(frozen=True)
class Claim:
    """``arm`` beats ``versus`` on ``metric`` (higher is better), as the paper reports it in ``paper``."""

    label: str
    arm: object
    versus: object
    metric: str
    paper: str


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    arms: Tuple
    metrics: Tuple  # (metric key, label) pairs: the columns of the table
    claims: Tuple
    paper: str  # the paper's own numbers, for the reader
    note: str = ""
    default: bool = True  # part of `make paper` (False: only with --tables)


BASELINE = Arm()
PFORMER = Arm(corpus="sent32k", w1=10, w2=100)
PFORMER_QA = Arm(corpus="qa32k", w1=10, w2=100)
STAGE1_ONLY = Arm(corpus="sent32k", w1=10, w2=0)
STAGE2_ONLY = Arm(corpus="sent32k", w1=0, w2=100)
PAIRED = Arm(corpus="paired", w1=10, w2=100)
SENT4K = Arm(corpus="sent4k", w1=10, w2=100)
BASELINE_FT = Arm(finetune=True)
PFORMER_FT = Arm(corpus="sent32k", w1=10, w2=100, finetune=True)
T5_BASELINE = Arm(llm="t5")
T5_PFORMER = Arm(llm="t5", corpus="sent32k", w1=10, w2=100)
VIDEO_ITG = VideoArm(align=False)
VIDEO_ALIGN = VideoArm(align=True)

VQA = (("vqa_test", "VQA test c+s+c"), ("vqa_test_color", "colour"), ("vqa_test_shape", "shape"),
       ("vqa_test_count", "count"), ("vqa_val", "VQA val c+s+c"))
CAPTIONS = (("cap_obj_test", "caption objects, test"), ("cider_test", "CIDEr test"),
            ("bleu4_test", "BLEU-4 test"))
OOD = (("vqa_test", "VQA in-domain"), ("vqa_test_ood", "VQA out-of-domain"),
       ("vqa_test_ood_held", "VQA out-of-domain, questions on a held-out pair"),
       ("cap_obj_test", "caption objects in-domain"), ("cap_obj_test_ood", "caption objects out-of-domain"),
       ("cap_held_test_ood", "held-out pairs named right"), ("cider_test_ood", "CIDEr out-of-domain"))

TABLES = (
    Table("table1", "Zero-shot VQA (paper Table 1)", (BASELINE, PFORMER, PFORMER_QA), VQA,
          (Claim("P-Former beats BLIP-2 at zero-shot VQA", PFORMER, BASELINE, "vqa_test",
                 "VQAv2 46.8 -> 52.6, OK-VQA 25.9 -> 30.0, GQA 30.5 -> 34.0"),),
          "OPT-2.7B, 4M pairs, BLIP-2 -> P-Former: VQAv2 val 46.8 -> 52.6, OK-VQA test 25.9 -> 30.0, "
          "GQA test-dev 30.5 -> 34.0",
          note="P-Former + QA term is this project's extension (stage 0 also learns to answer from the prompt, text "
               "only); it is not in the paper."),
    Table("table2", "Captioning after caption fine-tuning (paper Table 2)",
          (BASELINE, PFORMER, BASELINE_FT, PFORMER_FT),
          CAPTIONS + (("cap_scene_test", "caption scenes, test"), ("cap_obj_test_ood", "caption objects, OOD"),
                      ("cider_test_ood", "CIDEr OOD"), ("bleu4_test_ood", "BLEU-4 OOD")),
          (Claim("after fine-tuning, P-Former captions better (in-domain, COCO analogue)", PFORMER_FT, BASELINE_FT,
                 "cider_test", "COCO Karpathy test CIDEr 140.4 -> 141.8, BLEU-4 41.8 -> 42.3"),
           Claim("after fine-tuning, P-Former names the objects better (in-domain)", PFORMER_FT, BASELINE_FT,
                 "cap_obj_test", "(the miniature's object accuracy; the paper reports CIDEr / BLEU-4)"),
           Claim("after fine-tuning, P-Former captions better out of domain (NoCaps analogue)", PFORMER_FT,
                 BASELINE_FT, "cider_test_ood", "NoCaps zero-shot overall CIDEr 111.9 -> 115.1, out-domain "
                 "112.5 -> 114.1")),
          "COCO fine-tune (cross-entropy), BLIP-2 4M -> P-Former: Karpathy test CIDEr 140.4 -> 141.8, BLEU-4 "
          "41.8 -> 42.3; NoCaps CIDEr overall 111.9 -> 115.1, in 115.3 -> 118.3, near 111.0 -> 114.7, "
          "out 112.5 -> 114.1",
          note="Rows without _ft are the same models before fine-tuning (zero-shot captions after stage 2)."),
    Table("table6", "Amount of unimodal text for stage 0 (paper Table 6)", (BASELINE, PAIRED, SENT4K, PFORMER),
          VQA + (("cap_obj_test", "caption objects, test"), ("vqa_test_ood", "VQA OOD")),
          (Claim("a P-Former on 4,000 sentences beats one on the paired captions alone", SENT4K, PAIRED,
                 "vqa_test", "(no such row in the paper: its smallest stage-0 corpus is 4M sentences)"),
           Claim("a P-Former on 32,000 sentences beats one on 4,000", PFORMER, SENT4K, "vqa_test",
                 "VQAv2 51.7 (4M sentences) -> 52.6 (12M)"),
           Claim("a P-Former on 4,000 sentences beats no P-Former", SENT4K, BASELINE, "vqa_test",
                 "VQAv2 46.8 (none) -> 51.7 (4M)")),
          "stage-0 text, VQAv2 / OK-VQA / GQA: none 46.8 / 25.9 / 30.5; 4M sentences 51.7 / 28.2 / 32.3; "
          "12M 52.6 / 30.0 / 34.0"),
    Table("ood", "Text the pairs never hold: out-of-domain scenes (NoCaps out-domain in miniature)",
          (BASELINE, PAIRED, PFORMER, PFORMER_QA, BASELINE_FT, PFORMER_FT), OOD,
          (Claim("P-Former beats BLIP-2 at zero-shot VQA on out-of-domain scenes", PFORMER, BASELINE, "vqa_test_ood",
                 "(NoCaps out-domain, captions after fine-tuning: 112.5 -> 114.1)"),
           Claim("a teacher that read unpaired text beats one that read only the pairs, out of domain", PFORMER,
                 PAIRED, "vqa_test_ood", "(the paper's central argument; not measured there)"),
           Claim("after fine-tuning, P-Former names held-out pairs right more often", PFORMER_FT, BASELINE_FT,
                 "cap_held_test_ood", "(NoCaps out-domain CIDEr 112.5 -> 114.1)")),
          "NoCaps out-domain (objects absent from COCO's captions), after COCO fine-tuning: 112.5 -> 114.1 CIDEr",
          note="Held-out (colour, shape) pairs are in no image-caption pair of stages 1, 2 or fine-tuning, but in "
               "the frozen LM's corpus, in stage 0's unpaired text and in the frozen ViT's unpaired images."),
    Table("table4", "Which stage's alignment term helps (paper Table 4)",
          (BASELINE, STAGE1_ONLY, STAGE2_ONLY, PFORMER), VQA[:1] + (("cap_obj_test", "caption objects, test"),),
          (Claim("the stage-1 term alone helps", STAGE1_ONLY, BASELINE, "vqa_test", "VQAv2 46.8 -> 51.4"),
           Claim("the stage-2 term alone helps", STAGE2_ONLY, BASELINE, "vqa_test", "VQAv2 46.8 -> 50.4"),
           Claim("both terms beat the stage-1 term alone", PFORMER, STAGE1_ONLY, "vqa_test", "VQAv2 51.4 -> 52.6"),
           Claim("both terms beat the stage-2 term alone", PFORMER, STAGE2_ONLY, "vqa_test", "VQAv2 50.4 -> 52.6")),
          "(w1, w2), VQAv2 / OK-VQA / GQA: (0, 0) 46.8 / 25.9 / 30.5; (10, 0) 51.4 / 29.2 / 32.8; (0, 100) "
          "50.4 / 28.7 / 33.0; (10, 100) 52.6 / 30.0 / 34.0", default=False),
    Table("table5", "An encoder-decoder LLM (paper Table 5)", (T5_BASELINE, T5_PFORMER), VQA,
          (Claim("with Flan-T5, P-Former beats BLIP-2 at zero-shot VQA", T5_PFORMER, T5_BASELINE, "vqa_test",
                 "Flan-T5-XL VQAv2 48.3 -> 54.9, OK-VQA 31.5 -> 35.7, GQA 36.4 -> 40.3"),),
          "Flan-T5-XL, 4M pairs: VQAv2 48.3 -> 54.9, OK-VQA 31.5 -> 35.7, GQA 36.4 -> 40.3", default=False),
    Table("table7", "Video captioning (paper Table 7)", (VIDEO_ITG, VIDEO_ALIGN),
          tuple((f"{m}_{split}", f"{label} {split}") for split in ("test", "val")
                for m, label in (("cider", "CIDEr"), ("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L"),
                                 ("content", "content"))),
          (Claim("the alignment term improves video captions (CIDEr)", VIDEO_ALIGN, VIDEO_ITG, "cider_test",
                 "VATEX CIDEr 56.6 -> 60.9"),
           Claim("the alignment term improves video captions (BLEU-4)", VIDEO_ALIGN, VIDEO_ITG, "bleu4_test",
                 "VATEX BLEU-4 29.3 -> 30.9"),
           Claim("the alignment term improves video captions (ROUGE-L)", VIDEO_ALIGN, VIDEO_ITG, "rougeL_test",
                 "VATEX ROUGE-L 48.2 -> 49.1")),
          "VATEX, ITG -> ITG + alignment: BLEU-4 29.3 -> 30.9, CIDEr 56.6 -> 60.9, ROUGE-L 48.2 -> 49.1",
          note="On the synthetic video world (video_table; docs/demo.md). Scores as LAVIS's evaluator gives them "
               "(the paper prints them x100); content: share of videos whose caption names their colour, shape "
               "and direction. ITG + alignment: the alignment loss alone, then the captioning loss, the same "
               "steps in all.",
          default=False),
)
TABLE_KEYS = tuple(t.key for t in TABLES)


def select(keys):
    """The tables named in ``keys`` ("default", "all" or table keys), in TABLES order."""
    keys = set(keys)
    unknown = keys - set(TABLE_KEYS) - {"default", "all"}
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; choose from {', '.join(TABLE_KEYS)}, default, all")
    return tuple(t for t in TABLES if "all" in keys or t.key in keys or ("default" in keys and t.default))


def arms_of(tables):
    """Every arm the tables name, once, in order of appearance."""
    return tuple(dict.fromkeys(arm for t in tables for arm in t.arms))


def teachers_of(arms):
    """Every stage-0 teacher the arms align to, once: (llm, corpus)."""
    return tuple(dict.fromkeys(a.teacher for a in arms if isinstance(a, Arm) and a.teacher))
