"""lavis-pformer: P-Former for LAVIS. Importing this package registers everything into LAVIS's registry.

Also imports LAVIS's runners and lr schedulers, which ``import lavis`` alone does not register.
"""
import warnings

# Deprecation notices that LAVIS's dependencies (fairscale, timm) raise while LAVIS is imported; nothing a
# user of this package can act on, and they would open every train.py / evaluate.py output.
warnings.filterwarnings("ignore", message=r"`torch\.(jit\.script|cuda\.amp\.custom_(fwd|bwd))", category=FutureWarning)

import lavis  # noqa: E402,F401
import lavis.common.optims  # noqa: E402,F401  (lr schedulers)
import lavis.runners  # noqa: E402,F401  (runner_base, runner_iter)

from lavis_pformer import runtime  # noqa: E402,F401  (runner_pformer, CPU/gloo shims)
from lavis_pformer import runner_iter  # noqa: E402,F401  (runner_iter_pformer)
from lavis_pformer import datasets, models, tasks  # noqa: E402,F401

__version__ = "0.1.0"
