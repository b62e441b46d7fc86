"""Registered models: stage 0 (pformer_opt, pformer_t5), stage 1 (blip2_qformer_pformer) and stage 2
(blip2_opt_pformer, blip2_t5_pformer)."""
from lavis_pformer.models import pformer_opt, pformer_t5  # noqa: F401
from lavis_pformer.models import blip2_opt_pformer, blip2_qformer_pformer, blip2_t5_pformer  # noqa: F401
from lavis_pformer.models import video_opt_pformer  # noqa: F401  (video_opt_pformer: video captioning, Table 7)
