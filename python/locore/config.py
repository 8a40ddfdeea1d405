"""Model configuration: sizes, attention settings and descriptor projections (SPEC sections 2, 3, 5).

Sizes come from checkpoint shapes (checkpoint.py); the settings shapes cannot tell (heads, window,
LayerNorm eps, query global attention) come from a Longformer ``config.json`` or overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

PROJECTION_KINDS = ("identity", "linear", "bottleneck")
ACTIVATIONS = ("relu", "gelu", "tanh")


@dataclass(frozen=True)
class ProjectionConfig:
    """``local_to_lm`` / ``global_to_lm``: descriptor dim -> hidden (SPEC section 2).

    identity: no parameters (descriptor dim == hidden); linear: one Linear;
    bottleneck: Linear(dim -> bottleneck_dim) [-> activation] -> Linear(bottleneck_dim -> hidden).
    """

    kind: str = "identity"
    bottleneck_dim: Optional[int] = None
    activation: Optional[str] = None  # bottleneck only: None | relu | gelu | tanh
    bias: bool = True

    def validate(self, name: str, in_dim: int, hidden: int) -> None:
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"{name}: projection kind must be one of {PROJECTION_KINDS}, got {self.kind!r}")
        if self.kind == "identity" and in_dim != hidden:
            raise ValueError(f"{name}: an identity projection needs descriptor dim == hidden ({hidden}), got {in_dim}")
        if self.kind == "bottleneck":
            if not _positive_int(self.bottleneck_dim):
                raise ValueError(f"{name}: a bottleneck projection needs bottleneck_dim > 0, got {self.bottleneck_dim!r}")
            if self.activation is not None and self.activation not in ACTIVATIONS:
                raise ValueError(f"{name}: activation must be None or one of {ACTIVATIONS}, got {self.activation!r}")
        elif self.activation is not None:
            raise ValueError(f"{name}: only a bottleneck projection takes an activation, got {self.activation!r}")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class LoCoReConfig:
    """Everything the model needs; ``validate()`` runs on construction."""

    hidden: int = 768
    num_layers: int = 12
    num_attention_heads: Optional[int] = None  # None -> hidden // 64
    intermediate: int = 3072
    max_position_embeddings: int = 5122
    type_vocab_size: int = 1
    num_scales: int = 3
    attention_window: int = 512                 # even, > 0; one-sided window = attention_window // 2
    layer_norm_eps: float = 1e-5
    query_global_attention: bool = True
    local_dim: int = 768
    global_dim: Optional[int] = 768             # None: the model takes no global token
    local_projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    global_projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    l2_normalize: bool = False                  # L2-normalise projected descriptors (off in the release)

    def __post_init__(self) -> None:
        if self.num_attention_heads is None and _positive_int(self.hidden):
            object.__setattr__(self, "num_attention_heads", max(self.hidden // 64, 1))
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_attention_heads

    @property
    def one_sided_window(self) -> int:
        return self.attention_window // 2

    def validate(self) -> None:
        for name in ("hidden", "num_layers", "num_attention_heads", "intermediate", "max_position_embeddings",
                     "type_vocab_size", "num_scales", "local_dim"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        w = self.attention_window
        if not _positive_int(w) or w % 2:
            raise ValueError(f"attention_window must be an even positive int (one-sided window = "
                             f"attention_window // 2), got {w!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or isinstance(self.layer_norm_eps, bool) \
                or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.query_global_attention, bool):
            raise ValueError(f"query_global_attention must be a bool, got {self.query_global_attention!r}")
        if not isinstance(self.l2_normalize, bool):
            raise ValueError(f"l2_normalize must be a bool, got {self.l2_normalize!r}")
        if self.max_position_embeddings < 3:
            raise ValueError(f"max_position_embeddings must be >= 3 (positions start at 2), "
                             f"got {self.max_position_embeddings}")
        self.local_projection.validate("local_to_lm", self.local_dim, self.hidden)
        if self.global_dim is not None:
            if not _positive_int(self.global_dim):
                raise ValueError(f"config.global_dim must be a positive int or None, got {self.global_dim!r}")
            self.global_projection.validate("global_to_lm", self.global_dim, self.hidden)

    def replace(self, **changes: Any) -> "LoCoReConfig":
        return dataclasses.replace(self, **changes)


# Presets (SPEC section 5). tiny: the closest published config to the paper's tiny model, taking
# 768-d DINOv2 descriptors through Linear projections.
PRESETS = {
    "base": LoCoReConfig(),
    "small": LoCoReConfig(num_layers=6),
    "tiny": LoCoReConfig(hidden=256, num_layers=6, num_attention_heads=8, intermediate=1024,
                         local_projection=ProjectionConfig("linear"),
                         global_projection=ProjectionConfig("linear")),
}


def preset_config(name: str) -> LoCoReConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# Overrides use the Longformer config names (issue 4); the last two are LoCoRE settings shapes cannot tell.
OVERRIDES = {
    "num_attention_heads": "num_attention_heads",
    "attention_window": "attention_window",
    "layer_norm_eps": "layer_norm_eps",
    "query_global_attention": "query_global_attention",
    "num_layers": "num_layers",
    "num_hidden_layers": "num_layers",
    "projection_activation": None,   # activation of bottleneck projections with one (default relu)
    "l2_normalize": "l2_normalize",
}


def check_overrides(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(OVERRIDES)}")
    if "num_layers" in overrides and "num_hidden_layers" in overrides:
        raise ValueError("give num_layers or num_hidden_layers, not both")


def apply_overrides(cfg: LoCoReConfig, overrides: dict[str, Any]) -> LoCoReConfig:
    """Heads, window, eps, query global attention, first-n layers, projection activation, L2 norm."""
    check_overrides(overrides)
    changes = {OVERRIDES[k]: v for k, v in overrides.items() if OVERRIDES[k] is not None}
    if "num_layers" in changes:
        n = changes["num_layers"]
        if not _positive_int(n) or n > cfg.num_layers:
            raise ValueError(f"num_layers override must be an int in 1..{cfg.num_layers} "
                             f"(keeps the first n layers), got {n!r}")
    if "attention_window" in changes:
        changes["attention_window"] = attention_window_from(changes["attention_window"])
    act = overrides.get("projection_activation")
    if act is not None:
        for name in ("local_projection", "global_projection"):
            proj = getattr(cfg, name)
            if proj.kind == "bottleneck" and proj.activation is not None:
                changes[name] = dataclasses.replace(proj, activation=act)
    return cfg.replace(**changes)


def attention_window_from(value: Any) -> int:
    """Longformer's attention_window: an int, or a per-layer list that must hold one value."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("attention_window list is empty")
        if any(v != value[0] for v in value):
            raise ValueError(f"per-layer attention_window values differ ({sorted(set(value))}); "
                             "LoCoRE uses one window for all layers")
        value = value[0]
    if not _positive_int(value) or value % 2:
        raise ValueError(f"attention_window must be an even positive int, got {value!r}")
    return value


# Longformer config.json field -> LoCoReConfig field.
LONGFORMER_FIELDS = {
    "hidden_size": "hidden",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "attention_window": "attention_window",
    "layer_norm_eps": "layer_norm_eps",
}


def fields_from_longformer_json(cfg_json: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The fields of a Longformer config.json that LoCoRE uses, renamed to LoCoReConfig names."""
    if not isinstance(cfg_json, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(cfg_json).__name__}")
    act = cfg_json.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (LoCoRE uses the exact erf GELU, 'gelu')")
    pos_type = cfg_json.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"{source}: position_embedding_type {pos_type!r} is not supported (absolute only)")
    out = {ours: cfg_json[theirs] for theirs, ours in LONGFORMER_FIELDS.items() if theirs in cfg_json}
    if "attention_window" in out:
        out["attention_window"] = attention_window_from(out["attention_window"])
    for k in ("query_global_attention", "l2_normalize"):  # LoCoRE extras, if a config states them
        if k in cfg_json:
            out[k] = cfg_json[k]
    return out


def longformer_json(cfg: LoCoReConfig) -> dict[str, Any]:
    """The Longformer ``config.json`` that states ``cfg`` (what :func:`fields_from_longformer_json` reads
    back): written beside saved weights, since heads and window cannot be told from shapes."""
    out: dict[str, Any] = {"model_type": "longformer", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in LONGFORMER_FIELDS.items()})
    out["attention_window"] = [cfg.attention_window] * cfg.num_layers
    out.update(query_global_attention=cfg.query_global_attention, l2_normalize=cfg.l2_normalize)
    return out
