"""Process-wide facts the kernels depend on (a leaf module: imports nothing of locore_kernels)."""
from __future__ import annotations

import os


def triton_interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in its NumPy interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
