"""LoCoRE: fast, faithful inference for the long-context list-wise image re-ranker."""
__version__ = "0.1.0"
