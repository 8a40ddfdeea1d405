"""Reference checkpoints (SPEC section 5): read, infer the config from shapes, map keys to our parameters.

Our encoder layer keeps the five projections that run over every token fused in one Linear
``qkv`` with rows ``[query | key | value | key_global | value_global]``; the explicit ``key_map``
below says which reference tensor fills which rows of which parameter, and is used both ways
(loading and ``state_dict_to_reference``).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .errors import DataError, UnsafePickleError
from .unpickle import check_torch_file
from .config import (LoCoReConfig, ProjectionConfig, apply_overrides, check_overrides,
                     fields_from_longformer_json, longformer_json)

LM = "language_model.longformer."
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
QKV_ROWS = ("query", "key", "value", "key_global", "value_global")  # row blocks of layers.{i}.qkv


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem found."""


@dataclass(frozen=True)
class KeyMapEntry:
    ref: str                        # SPEC key name
    param: str                      # our state_dict name
    shape: tuple[int, ...]          # shape of the reference tensor
    rows: Optional[slice] = None    # rows of ``param`` it fills (None: the whole tensor)


def _linear(ref: str, ours: str, out_dim: int, in_dim: int, bias: bool = True) -> list[KeyMapEntry]:
    entries = [KeyMapEntry(f"{ref}.weight", f"{ours}.weight", (out_dim, in_dim))]
    if bias:
        entries.append(KeyMapEntry(f"{ref}.bias", f"{ours}.bias", (out_dim,)))
    return entries


def _projection(ref: str, proj: ProjectionConfig, in_dim: int, hidden: int) -> list[KeyMapEntry]:
    if proj.kind == "identity":
        return []
    if proj.kind == "linear":
        return _linear(ref, ref, hidden, in_dim, proj.bias)
    second = 2 if proj.activation is not None else 1  # nn.Sequential index of the second Linear
    return (_linear(f"{ref}.0", f"{ref}.0", proj.bottleneck_dim, in_dim, proj.bias)
            + _linear(f"{ref}.{second}", f"{ref}.{second}", hidden, proj.bottleneck_dim, proj.bias))


def key_map(cfg: LoCoReConfig) -> list[KeyMapEntry]:
    """Every reference tensor of a model with this config, and where it lives in ``LoCoRe``."""
    H, I = cfg.hidden, cfg.intermediate
    m = [
        KeyMapEntry(LM + "sep_embedding", "sep_embedding", (H,)),
        KeyMapEntry(LM + "pad_embedding", "pad_embedding", (H,)),
        KeyMapEntry(LM + "embeddings.position_embeddings.weight", "position_embeddings",
                    (cfg.max_position_embeddings, H)),
        KeyMapEntry(LM + "embeddings.token_type_embeddings.weight", "token_type_embeddings",
                    (cfg.type_vocab_size, H)),
        KeyMapEntry(LM + "embeddings.LayerNorm.weight", "embed_ln.weight", (H,)),
        KeyMapEntry(LM + "embeddings.LayerNorm.bias", "embed_ln.bias", (H,)),
    ]
    for i in range(cfg.num_layers):
        ref, ours = f"{LM}encoder.layer.{i}.", f"layers.{i}."
        for j, name in enumerate(QKV_ROWS):
            rows = slice(j * H, (j + 1) * H)
            m.append(KeyMapEntry(f"{ref}attention.self.{name}.weight", ours + "qkv.weight", (H, H), rows))
            m.append(KeyMapEntry(f"{ref}attention.self.{name}.bias", ours + "qkv.bias", (H,), rows))
        m += _linear(ref + "attention.self.query_global", ours + "query_global", H, H)
        m += _linear(ref + "attention.output.dense", ours + "out", H, H)
        m += [KeyMapEntry(ref + "attention.output.LayerNorm.weight", ours + "ln1.weight", (H,)),
              KeyMapEntry(ref + "attention.output.LayerNorm.bias", ours + "ln1.bias", (H,))]
        m += _linear(ref + "intermediate.dense", ours + "ff1", I, H)
        m += _linear(ref + "output.dense", ours + "ff2", H, I)
        m += [KeyMapEntry(ref + "output.LayerNorm.weight", ours + "ln2.weight", (H,)),
              KeyMapEntry(ref + "output.LayerNorm.bias", ours + "ln2.bias", (H,))]
    m += _linear("language_model.classifier", "classifier", 2, H)
    m.append(KeyMapEntry("scale_encoder.weight", "scale_embedding", (cfg.num_scales, H)))
    m += _projection("local_to_lm", cfg.local_projection, cfg.local_dim, H)
    if cfg.global_dim is not None:
        m += _projection("global_to_lm", cfg.global_projection, cfg.global_dim, H)
    return m


# ---------------------------------------------------------------------------------------------
# Reading files: a name -> shape listing first, tensors one at a time (peak memory ~ the model).

class TensorSource:
    """Names, shapes and dtypes of a checkpoint's tensors, and lazy access to each one."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], get, config_json: Optional[dict] = None,
                 dtypes: Optional[dict[str, torch.dtype]] = None):
        self.path, self.shapes, self._get, self.config_json = path, shapes, get, config_json
        self.dtypes = dtypes or {}

    def __getitem__(self, key: str) -> Tensor:
        return self._get(key)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0  # bool is not int here; floats and strings are not counts


def _read_safetensors(path: str) -> TensorSource:
    """The safetensors layout (u64 header size, JSON header, raw little-endian data) read with plain
    file reads, one tensor at a time: a memory map would add the whole file to the resident set.
    The header is validated here, in Python integers (no wrap-around), before anything is allocated."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise bad("bad header size")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"header is not JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries = {}
    for key, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise bad(f"entry {key!r}: unknown dtype {str(dtype)[:20]!r} (expected one of {list(_SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_is_count(s) for s in shape):
            raise bad(f"entry {key!r}: shape must be a list of non-negative integers, got {str(shape)[:60]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise bad(f"entry {key!r}: data_offsets must be two non-negative integers, got {str(offsets)[:60]}")
        torch_dtype = _SAFETENSORS_DTYPES[dtype]
        nbytes = math.prod(shape) * torch_dtype.itemsize  # Python ints: a 2**62-element shape cannot wrap
        begin, end = offsets
        if end - begin != nbytes:
            raise bad(f"data offsets of {key!r} span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
        if not begin <= end <= data_size:
            raise bad(f"data of {key!r} ({begin}..{end}) lies outside the file's {data_size} data bytes")
        entries[key] = (torch_dtype, tuple(shape), 8 + n + begin)

    def get(key: str) -> Tensor:
        dtype, shape, offset = entries[key]
        t = torch.empty(shape, dtype=dtype)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != t.numel() * dtype.itemsize:
                raise bad(f"file ends inside {key!r}")
        return t

    return TensorSource(path, {k: e[1] for k, e in entries.items()}, get,
                        dtypes={k: e[0] for k, e in entries.items()})


def _read_torch(path: str) -> TensorSource:
    """torch.load with weights_only=True, after a dry run of the file's pickle through the metered
    restricted unpickler (locore.unpickle): a file that needs arbitrary pickle code is refused, never
    run, and one whose pickle would build far more than the file holds (bytearray(10**10), a storage
    larger than its record) is refused before torch allocates it."""
    try:
        check_torch_file(path)
    except UnsafePickleError as e:
        raise CheckpointError(f"{path}: refused to load: {e} (checked before torch.load(weights_only=True): a "
                              "checkpoint may hold only tensors in dicts; arbitrary pickle code is never run). "
                              "Re-save the weights as safetensors, or as a plain dict of tensors.") from None
    except DataError as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    try:
        with warnings.catch_warnings():  # pickle-protocol notices for plain pickles: the refusal says enough
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False; keep only the reason (the global or opcode refused).
        text = " ".join(str(e).split())
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use| Check the documentation|$)", text)
        raise CheckpointError(
            f"{path}: refused to load: the file needs arbitrary pickle code, which is never run "
            f"(torch.load(weights_only=True): {reason.group(1).strip() if reason else type(e).__name__}). "
            "Re-save the weights as safetensors, or as a plain dict of tensors.") from None
    except Exception as e:  # noqa: BLE001 - any other reason the file is not a torch checkpoint
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    # Training frameworks often nest the weights one level down.
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (str -> Tensor), got {type(obj).__name__}")
    return TensorSource(path, {k: tuple(v.shape) for k, v in obj.items()}, obj.__getitem__,
                        dtypes={k: v.dtype for k, v in obj.items()})


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """A ``.safetensors`` or torch ``.pt/.pth/.bin`` file, or a folder with one plus ``config.json``."""
    path = os.fspath(path)
    config_json = None
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in FOLDER_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise CheckpointError(f"{path}: folder holds none of {list(FOLDER_FILES)}")
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    config_json = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{cfg_path}: not readable JSON ({e})") from None
        path = found[0]
    elif not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if path.endswith(".safetensors"):
        src = _read_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        src = _read_torch(path)
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint file type; expected .safetensors, "
                              f"{', '.join(TORCH_SUFFIXES)} or a folder with model.safetensors")
    src.config_json = config_json
    return src


# ---------------------------------------------------------------------------------------------
# Sizes from shapes.

def _projection_from_keys(prefix: str, shapes: dict[str, tuple[int, ...]], hidden: int,
                          activation: str) -> tuple[ProjectionConfig, Optional[int]]:
    """(projection, descriptor dim) from the ``prefix.*`` keys; (identity, hidden) when there are none."""
    keys = {k[len(prefix) + 1:] for k in shapes if k.startswith(prefix + ".")}
    if not keys:
        return ProjectionConfig("identity"), hidden
    if "weight" in keys:
        return ProjectionConfig("linear", bias="bias" in keys), shapes[prefix + ".weight"][-1]
    if "0.weight" in keys:
        w0 = shapes[prefix + ".0.weight"]
        act = activation if "2.weight" in keys else None
        return (ProjectionConfig("bottleneck", bottleneck_dim=w0[0], activation=act, bias="0.bias" in keys),
                w0[-1])
    raise CheckpointError(f"cannot tell the {prefix} projection from its keys {sorted(keys)} "
                          "(expected .weight, or .0.weight with .1.weight / .2.weight)")


def infer_config(shapes: dict[str, tuple[int, ...]], config_json: Optional[dict] = None,
                 overrides: Optional[dict[str, Any]] = None) -> LoCoReConfig:
    """LoCoReConfig from tensor shapes; heads/window/eps from config.json, then overrides on top."""
    overrides = dict(overrides or {})
    check_overrides(overrides)

    def dim(key: str, axis: int) -> Optional[int]:
        s = shapes.get(key)
        return s[axis] if s is not None and len(s) > axis else None

    hidden = dim(LM + "sep_embedding", 0) or dim(LM + "embeddings.LayerNorm.weight", 0)
    if hidden is None:
        raise CheckpointError("cannot find the hidden size: the checkpoint has neither "
                              f"{LM}sep_embedding nor {LM}embeddings.LayerNorm.weight (is this a LoCoRE checkpoint?)")
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(LM) + r"encoder\.layer\.(\d+)\.", k))}
    num_layers = 0
    while num_layers in layer_ids:
        num_layers += 1
    act = overrides.get("projection_activation") or "relu"
    local_proj, local_dim = _projection_from_keys("local_to_lm", shapes, hidden, act)
    global_proj, global_dim = _projection_from_keys("global_to_lm", shapes, hidden, act)
    fields: dict[str, Any] = dict(
        hidden=hidden,
        num_layers=max(num_layers, 1),
        intermediate=dim(LM + "encoder.layer.0.intermediate.dense.weight", 0) or 4 * hidden,
        max_position_embeddings=dim(LM + "embeddings.position_embeddings.weight", 0) or 5122,
        type_vocab_size=dim(LM + "embeddings.token_type_embeddings.weight", 0) or 1,
        num_scales=dim("scale_encoder.weight", 0) or 3,
        local_dim=local_dim, global_dim=global_dim,
        local_projection=local_proj, global_projection=global_proj,
    )
    if config_json is not None:
        stated = fields_from_longformer_json(config_json)
        clashes = [f"config.json {k}={v} but the weights say {fields[k]}"
                   for k, v in stated.items() if k in fields and v != fields[k]]
        if clashes:
            raise CheckpointError("config.json disagrees with the checkpoint's shapes:\n  " + "\n  ".join(clashes))
        fields.update(stated)
    try:
        cfg = LoCoReConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"invalid configuration for this checkpoint: {e}") from None
    return apply_overrides(cfg, overrides)


def check_keys(cfg: LoCoReConfig, shapes: dict[str, tuple[int, ...]],
               ignore: tuple[str, ...] = ()) -> list[KeyMapEntry]:
    """The key map for ``cfg``; missing, unexpected and mis-shaped keys are raised together."""
    entries = key_map(cfg)
    expected = {e.ref for e in entries}
    missing = [e.ref for e in entries if e.ref not in shapes]
    unexpected = [k for k in shapes if k not in expected and not k.startswith(ignore)]
    wrong = [f"{e.ref}: checkpoint {list(shapes[e.ref])}, model expects {list(e.shape)}"
             for e in entries if e.ref in shapes and tuple(shapes[e.ref]) != e.shape]
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                             ("shape mismatches", wrong)):
            if items:
                parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(items))
        raise CheckpointError("checkpoint does not match the LoCoRE layout (SPEC section 5):\n  " + "\n  ".join(parts))
    return entries


def dropped_layer_prefixes(shapes: dict[str, tuple[int, ...]], keep: int) -> tuple[str, ...]:
    """Prefixes of the layers a ``num_layers`` override leaves out (not 'unexpected')."""
    ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(LM) + r"encoder\.layer\.(\d+)\.", k))}
    return tuple(f"{LM}encoder.layer.{i}." for i in sorted(ids) if i >= keep)


def load_into(model: torch.nn.Module, src: TensorSource, entries: list[KeyMapEntry]) -> None:
    """Copy each reference tensor into its rows of the model's parameters (dtype/device converted).

    Refused, naming the key: a tensor that is not floating point (an int64 or bool tensor would load as
    numbers that were never weights), and one holding NaN or inf (it would give finite but wrong scores).
    """
    not_float = [f"{e.ref}: {src.dtypes[e.ref]}" for e in entries
                 if e.ref in src.dtypes and not src.dtypes[e.ref].is_floating_point]
    if not_float:
        raise CheckpointError(f"{src.path}: {len(not_float)} checkpoint tensors are not floating point (weights "
                              "must be float16 / bfloat16 / float32 / float64):\n    " + "\n    ".join(not_float))
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    with torch.no_grad():
        for e in entries:
            t = src[e.ref]
            if not t.is_floating_point():
                raise CheckpointError(f"{src.path}: tensor {e.ref} is {t.dtype}, not floating point")
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{src.path}: tensor {e.ref} holds {bad} NaN / inf values; refusing "
                                      "non-finite weights")
            dst = params[e.param]
            dst = dst[e.rows] if e.rows is not None else dst
            dst.copy_(t)


def iter_reference(model: torch.nn.Module, cfg: LoCoReConfig) -> Iterator[tuple[str, Tensor]]:
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    for e in key_map(cfg):
        t = params[e.param].detach()
        yield e.ref, (t[e.rows] if e.rows is not None else t)


def state_dict_to_reference(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's weights under the SPEC key names: fp32, CPU, contiguous (savable as safetensors)."""
    return {k: t.to(device="cpu", dtype=torch.float32).contiguous().clone()
            for k, t in iter_reference(model, model.config)}


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike) -> str:
    """Write ``folder/model.safetensors`` (SPEC key layout, fp32) + ``folder/config.json``, all or nothing:
    both go into a temporary folder beside ``folder`` that is renamed over it once complete, so a
    reader (``from_pretrained``, the published code) never sees half a checkpoint. Returns ``folder``."""
    import shutil

    from safetensors.torch import save_file

    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(state_dict_to_reference(model), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(longformer_json(model.config), f, indent=1)
        if os.path.isdir(folder):  # replace an older save of the same name: move it aside first
            old = tmp + ".old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
