"""LoCoRE: fast, faithful inference for the long-context list-wise image re-ranker.

``locore.LoCoRe`` and ``locore.LoCoReConfig`` are imported on first use, so that importing a
torch-free part (``locore.cli --help``, ``locore.data``, ``locore.scoring``) does not load the model.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["LoCoRe", "LoCoReConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LoCoRe":
        from .model import LoCoRe
        return LoCoRe
    if name == "LoCoReConfig":
        from .config import LoCoReConfig
        return LoCoReConfig
    raise AttributeError(f"module 'locore' has no attribute {name!r}")
