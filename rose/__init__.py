"""rose: one-shot pruning of LLMs with ROSE (reordered SparseGPT) and its baselines."""
from .config import PruneConfig, Sparsity
from .errors import RoseError

__all__ = ["PruneConfig", "Sparsity", "RoseError"]
__version__ = "0.1.0"
