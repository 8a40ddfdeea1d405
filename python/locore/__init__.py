"""LoCoRE: fast, faithful inference for the long-context list-wise image re-ranker."""
__version__ = "0.1.0"

from .config import LoCoReConfig  # noqa: E402
from .model import LoCoRe  # noqa: E402

__all__ = ["LoCoRe", "LoCoReConfig", "__version__"]
