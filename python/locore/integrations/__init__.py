"""Integrations of LoCoRE's kernels into other libraries' models (no third-party import at module level)."""
from .longformer import patch_longformer, patched_modules, unpatch_longformer

__all__ = ["patch_longformer", "patched_modules", "unpatch_longformer"]
