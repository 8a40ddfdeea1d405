"""Errors for untrusted input files, shared by the data readers and the checkpoint loader: every problem
with a user's file is a :class:`DataError` naming the file."""
from __future__ import annotations

import pickle


class DataError(ValueError):
    """A problem with the user's input files: missing, malformed or inconsistent (the message says which)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""
