"""Score modes: how an image's score is read from the token logits (SPEC section 4). Torch-free.

One table, ``SCORE_MODES``; everything that depends on the mode (the model's columns and reduction,
whether its last layer can be pruned, the re-ranker's normalisation, the CLI's ``--mode`` choices)
reads it. Adding a mode is one entry here.

A gallery block has T tokens: [global] locals [SEP]; the [SEP] column T-1 is never read.
``match [..., C]`` below is the match logit (or its softmax probability) of the C columns read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple


@dataclass(frozen=True)
class ScoreMode:
    name: str
    columns: Callable[[int], range]   # T -> the token columns of a gallery block that are read
    reduce: Callable[[Any], Any]      # match [..., C] -> score [...] (tensor or array methods only)
    prunable: bool                    # the last layer may run on the read rows only (few columns)
    sliding_divisor: Callable[[int], float]  # T -> what the sliding re-ranker divides the score by

    def sliding_normalise(self, scores: Any, tokens: int) -> Any:
        """The re-ranker's sliding-window path divides max-sum scores by T, as the reference does."""
        d = self.sliding_divisor(tokens)
        return scores if d == 1 else scores / d


def _one(T: int) -> float:
    return 1.0


SCORE_MODES: Dict[str, ScoreMode] = {m.name: m for m in (
    ScoreMode("max-start", lambda T: range(0, 1), lambda m: m[..., 0], True, _one),
    ScoreMode("max-end", lambda T: range(T - 2, T - 1), lambda m: m[..., 0], True, _one),
    ScoreMode("max-sum", lambda T: range(0, T - 1), lambda m: m.sum(-1), False, float),
    ScoreMode("max-prod", lambda T: range(0, T - 1), lambda m: m.prod(-1), False, _one),
)}
MODE_NAMES: Tuple[str, ...] = tuple(SCORE_MODES)
DEFAULT_MODE = "max-end"


def score_mode(name: str) -> ScoreMode:
    """The table entry of ``name``; ValueError naming the choices otherwise."""
    try:
        return SCORE_MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"mode must be one of {MODE_NAMES}, got {name!r}") from None
