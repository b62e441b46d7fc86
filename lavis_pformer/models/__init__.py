"""Registered models: stage 0 (pformer_opt, pformer_t5)."""
from lavis_pformer.models import pformer_opt, pformer_t5  # noqa: F401
