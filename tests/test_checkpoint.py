"""Checkpoint loading: file kinds, one error listing every key problem, weights_only safety, config.json."""
from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from locore import LoCoRe, LoCoReConfig
from locore.checkpoint import CheckpointError, key_map, open_checkpoint, state_dict_to_reference
from locore.config import ProjectionConfig
from hf_baseline import random_reference_state_dict

CFG = LoCoReConfig(hidden=32, num_layers=2, num_attention_heads=2, intermediate=64, max_position_embeddings=64,
                   attention_window=8, local_dim=24, global_dim=32,
                   local_projection=ProjectionConfig("linear"))
LM = "language_model.longformer."


def inputs(cfg: LoCoReConfig, K: int = 3, S: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, S, cfg.local_dim, generator=g), torch.randint(0, 3, (1, S), generator=g),
            torch.zeros(1, S), torch.randn(1, K, S, cfg.local_dim, generator=g),
            torch.randint(0, 3, (1, K, S), generator=g), torch.zeros(1, K, S))


def load(path, **kw):
    return LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=2, attention_window=8, **kw)


def test_wrong_file_kinds(tmp_path):
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type"):
        load(txt)
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(junk)
    junk_pt = tmp_path / "weights.pt"
    junk_pt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="weights.pt"):
        load(junk_pt)
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="folder holds none of"):
        load(tmp_path)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load(not_a_state_dict)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    sd = random_reference_state_dict(CFG)
    del sd[LM + "encoder.layer.1.attention.self.key_global.bias"]
    sd["language_model.pooler.dense.weight"] = torch.zeros(3, 3)
    sd[LM + "encoder.layer.0.intermediate.dense.bias"] = torch.zeros(65)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load(path)
    msg = str(info.value)
    assert "1 missing keys" in msg and "encoder.layer.1.attention.self.key_global.bias" in msg
    assert "1 unexpected keys" in msg and "language_model.pooler.dense.weight" in msg
    assert "1 shape mismatches" in msg and "encoder.layer.0.intermediate.dense.bias: checkpoint [65]" in msg


def test_not_a_locore_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="cannot find the hidden size"):
        load(path)


def test_sequence_longer_than_position_table(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(random_reference_state_dict(CFG), str(path))
    model = load(path)
    model.score(*inputs(CFG, K=11, S=4))  # (1 + 11) * 5 = 60 <= 64 - 2
    with pytest.raises(ValueError, match=r"longer than the position table allows \(64 - 2 = 62\)"):
        model.score(*inputs(CFG, K=12, S=4))  # 65 tokens


def test_torch_files_load_with_weights_only(tmp_path):
    sd = random_reference_state_dict(CFG)
    st, pt, nested = tmp_path / "m.safetensors", tmp_path / "m.pt", tmp_path / "nested.bin"
    save_file(sd, str(st))
    torch.save(sd, pt)
    torch.save({"state_dict": sd}, nested)
    x = inputs(CFG)
    ref = load(st).score(*x)
    assert torch.equal(load(pt).score(*x), ref)
    assert torch.equal(load(nested).score(*x), ref)


class _Evil:
    """Unpickling this would create a file: a checkpoint that needs arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_code_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = dict(random_reference_state_dict(CFG), extra=_Evil(marker))
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert "evil.bin" in str(info.value)
    if writer == "torch.save":
        assert "refused to load" in str(info.value) and "arbitrary pickle code" in str(info.value)
    assert not marker.exists(), "the pickle's code ran"


def test_folder_with_config_json(tmp_path):
    save_file(random_reference_state_dict(CFG), str(tmp_path / "model.safetensors"))
    config = {"model_type": "longformer", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64, "attention_window": [12, 12],
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "vocab_size": 50265}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = LoCoRe.from_pretrained(tmp_path, device="cpu")
    assert (model.config.num_attention_heads, model.config.attention_window, model.config.layer_norm_eps) == \
        (4, 12, 1e-6)
    assert LoCoRe.from_pretrained(tmp_path, device="cpu", num_attention_heads=2).config.num_attention_heads == 2

    (tmp_path / "config.json").write_text(json.dumps(dict(config, attention_window=[12, 16])))
    with pytest.raises(ValueError, match="per-layer attention_window values differ"):
        LoCoRe.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_size=48)))
    with pytest.raises(CheckpointError, match="config.json hidden_size|config.json hidden=48"):
        LoCoRe.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        LoCoRe.from_pretrained(tmp_path, device="cpu")


def test_overrides_are_checked(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(random_reference_state_dict(CFG), str(path))
    with pytest.raises(ValueError, match="unknown override"):
        load(path, hidden_size=64)
    with pytest.raises(ValueError, match="even positive int"):
        LoCoRe.from_pretrained(path, device="cpu", attention_window=7)
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=5)
    with pytest.raises(ValueError, match=r"num_layers override must be an int in 1\.\.2"):
        load(path, num_layers=3)
    assert len(load(path, num_layers=1).layers) == 1


def test_round_trip_state_dict_to_reference(tmp_path):
    """Preset -> SPEC key names (the same set the independent oracle writes) -> file -> identical model."""
    for cfg_kw in (dict(), dict(local_projection=ProjectionConfig("bottleneck", 16, "tanh"), local_dim=24,
                                global_projection=ProjectionConfig("bottleneck", 8), global_dim=20)):
        model = LoCoRe.preset("tiny", device="cpu", seed=1, num_layers=2, hidden=32, num_attention_heads=2,
                              intermediate=64, max_position_embeddings=64, attention_window=8,
                              **(cfg_kw or dict(local_dim=24, global_dim=32)))
        sd = state_dict_to_reference(model)
        assert set(sd) == set(random_reference_state_dict(model.config))
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
        path = tmp_path / "round.safetensors"
        save_file(sd, str(path))
        loaded = LoCoRe.from_pretrained(path, device="cpu", num_attention_heads=2, attention_window=8,
                                        projection_activation="tanh")
        assert loaded.config == model.config
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        # every parameter is covered by the key map
        covered = {e.param for e in key_map(model.config)}
        assert covered == set(model.state_dict())


# ------------------------------------------------------------------------------------------------
# Refused at load (issue 13.2, 13.8, 13.9): non-finite / non-float weights, hostile headers, memory bombs.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, bad, suffix):
    sd = random_reference_state_dict(CFG)
    key = LM + "encoder.layer.1.output.dense.weight"
    sd[key][3, 5] = bad
    path = tmp_path / f"m{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"{key} holds 1 NaN / inf values"):
        load(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_integer_and_bool_tensors_are_refused_naming_key_and_dtype(tmp_path, dtype, suffix):
    sd = random_reference_state_dict(CFG)
    key = LM + "embeddings.LayerNorm.bias"
    sd[key] = sd[key].round().to(dtype)
    path = tmp_path / f"m{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"not floating point.*\n.*{key}: {dtype}"):
        load(path)


def _safetensors_with_header(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("entry, why", [
    ({"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": ["2", 2], "data_offsets": [0, 16]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "data_offsets must be two non-negative integers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "data_offsets must be two non-negative integers"),
    ({"dtype": "F32", "shape": [2**62], "data_offsets": [0, 0]}, "span 0 bytes but shape"),
    ({"dtype": "F32", "shape": [2**62, 2**2], "data_offsets": [0, 16]}, "span 16 bytes but shape"),
    ({"dtype": "F32", "shape": [2**31, 2**31, 2**2], "data_offsets": [0, 0]}, "span 0 bytes"),
    ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "outside the file"),
    ({"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [4]}, "exactly dtype, shape and data_offsets"),
    ("not a dict", "exactly dtype, shape and data_offsets"),
])
def test_hostile_safetensors_headers_give_one_line_errors(tmp_path, entry, why):
    path = tmp_path / "h.safetensors"
    _safetensors_with_header(path, {"w": entry})
    with pytest.raises(CheckpointError, match=why) as info:
        load(path)
    assert "h.safetensors" in str(info.value) and "\n" not in str(info.value)


class _Bytearray:
    def __reduce__(self):
        return (bytearray, (10**10,))


def test_pt_memory_bomb_is_refused_before_torch_allocates(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(1), "x": _Bytearray()}, path)
    assert path.stat().st_size < 2000
    with pytest.raises(CheckpointError, match="refused to load.*bytearray"):
        load(path)
    legacy = tmp_path / "bomb_legacy.pt"
    torch.save({"x": _Bytearray()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused to load.*bytearray"):
        load(legacy)


@pytest.fixture(scope="module")
def valid_small_files(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    folder = tmp_path_factory.mktemp("fuzz")
    cfg = LoCoReConfig(hidden=8, num_layers=1, num_attention_heads=2, intermediate=8, max_position_embeddings=16,
                       attention_window=4, local_dim=8, global_dim=None)
    sd = random_reference_state_dict(cfg)
    save_file(sd, str(folder / "ok.safetensors"))
    torch.save(sd, folder / "ok.pt")
    return folder, {s: (folder / f"ok{s}").read_bytes() for s in (".safetensors", ".pt")}


@settings(max_examples=150, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from([".safetensors", ".pt"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_random_corruptions_give_only_checkpoint_errors(valid_small_files, suffix, edits, cut):
    """Random byte corruptions of a valid small .safetensors and .pt: a CheckpointError (or a clean load,
    when the bytes hit tensor data), never another exception; hypothesis' deadline catches a hang."""
    folder, files = valid_small_files
    data = bytearray(files[suffix])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = folder / f"fuzz{suffix}"
    path.write_bytes(bytes(data))
    try:
        src = open_checkpoint(path)
        for key in src.shapes:
            src[key]
    except CheckpointError as e:
        assert str(path) in str(e)
