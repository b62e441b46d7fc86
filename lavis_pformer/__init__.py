"""lavis-pformer: P-Former for LAVIS. Importing this package registers everything into LAVIS's registry.

Also imports LAVIS's runners and lr schedulers, which ``import lavis`` alone does not register.
"""
import lavis  # noqa: F401
import lavis.common.optims  # noqa: F401  (lr schedulers)
import lavis.runners  # noqa: F401  (runner_base, runner_iter)

from lavis_pformer import runtime  # noqa: F401  (runner_pformer, CPU/gloo shims)
from lavis_pformer import datasets, models, tasks  # noqa: F401

__version__ = "0.1.0"
