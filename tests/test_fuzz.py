"""Bounded fuzzing (hypothesis) of the two readers that parse files from strangers:
`imagic.checkpoint.read_state_dict` (random bytes, mutated safetensors, mutated torch zips and legacy pickles,
generated safetensors headers) and `imagic.config.from_ldm_yaml` (random YAML documents, mutated real configs,
random text, YAML's own hazards). Only CheckpointError / ConfigError may come out, with a one-line message, and
never a hang (pytest-timeout stops a stuck example).

`make test` runs a few hundred examples in all (well under 30 s). For a long local run:

    IMAGIC_FUZZ_EXAMPLES=100000 python -m pytest tests/test_fuzz.py -p no:cacheprovider --timeout=0

(see benchmarks/results/hardening.md for what the long runs found).
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import typing
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from imagic.checkpoint import CheckpointError, read_state_dict
from imagic.config import ConfigError, ModelConfig, from_ldm_yaml, preset, to_ldm_yaml
from tests.tiny import tiny_config

EXAMPLES = int(os.environ.get("IMAGIC_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TIMEOUT = 0 if EXAMPLES else 120  # whole-test limit in `make test`; 0 (none) for long local runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _read(folder: Path, data: bytes, name: str = "f.bin") -> None:
    """The contract of read_state_dict on arbitrary bytes."""
    p = folder / name
    p.write_bytes(data)
    try:
        sd = read_state_dict(p)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(p) in str(e), str(e)
        return
    assert isinstance(sd, dict) and sd
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


# --- seeds: valid files in every format the reader accepts ---------------------------------------------------------
def _seeds(folder: Path) -> Dict[str, bytes]:
    sd = {"model.diffusion_model.w": torch.randn(3, 4), "cond_stage_model.h": torch.ones(5, dtype=torch.float16),
          "first_stage_model.i": torch.arange(6), "b": torch.zeros(2, dtype=torch.bfloat16)}
    seeds = {"safetensors": save(sd, metadata={"format": "pt", "note": "seed"})}
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 7, "name": "seed"}, folder / "zip.ckpt")
    torch.save({"state_dict": sd}, folder / "legacy.ckpt", _use_new_zipfile_serialization=False)
    seeds["zip"] = (folder / "zip.ckpt").read_bytes()
    seeds["legacy"] = (folder / "legacy.ckpt").read_bytes()
    return seeds


@pytest.fixture(scope="module")
def seeds(folder) -> Dict[str, bytes]:
    return _seeds(folder)


# Positions anywhere, or in the last quarter, where a zip keeps its central directory (member names, sizes,
# compression methods, offsets): mutations there reach the most parser code per example.
Mutation = st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete", "word"]),
                     st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.75, 1.0, exclude_max=True)),
                     st.integers(0, 255),
                     st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**62]))


def _mutate(data: bytes, mutations: List[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, byte, word in mutations:
        if not out:
            out = bytearray(b"\0")
        i = int(where * len(out))
        if kind == "flip":
            out[i] ^= 1 << (byte % 8)
        elif kind == "set":
            out[i] = byte
        elif kind == "cut":
            out = out[: max(1, i)]
        elif kind == "insert":
            out[i:i] = bytes([byte]) * (1 + byte % 7)
        elif kind == "delete":
            del out[i:i + 1 + byte % 7]
        else:  # a length, offset or size field replaced by a boundary value
            out[i:i + 8] = word.to_bytes(8, "little")
    return bytes(out)


# --- read_state_dict ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", struct.pack("<Q", 20) + b"{"]),
       body=st.binary(max_size=400))
def test_random_bytes(folder, prefix, body):
    _read(folder, prefix + body)


@pytest.mark.timeout(TIMEOUT)
@settings(FUZZ, max_examples=EXAMPLES or 1500)  # ~5 ms an example: most of the fuzzing budget goes here
@given(fmt=st.sampled_from(["safetensors", "zip", "legacy"]), mutations=st.lists(Mutation, min_size=1, max_size=6))
def test_mutated_valid_files(folder, seeds, fmt, mutations):
    _read(folder, _mutate(seeds[fmt], mutations))


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(fmt=st.sampled_from(["safetensors", "zip", "legacy"]), cut=st.floats(0.0, 1.0))
def test_truncated_valid_files(folder, seeds, fmt, cut):
    data = seeds[fmt]
    _read(folder, data[: max(1, int(cut * len(data)))])


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "X", ""]
BOUNDARY = st.sampled_from([math.inf, -math.inf, math.nan, 0, -1, 2**63, 2**64, -2**63, 1e300, 0.5, True])
NUMBERS = st.one_of(st.integers(-3, 40), BOUNDARY, st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.none())
ENTRY = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(NUMBERS, max_size=4),
                           "data_offsets": st.one_of(st.tuples(NUMBERS, NUMBERS), st.lists(NUMBERS, max_size=3))}),
    st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES[:4]), "shape": st.lists(st.integers(0, 4), max_size=3),
                           "data_offsets": st.tuples(st.integers(0, 64), st.integers(0, 64))}),
    NUMBERS, st.lists(NUMBERS, max_size=3), st.dictionaries(st.text(max_size=3), NUMBERS, max_size=3))


@pytest.mark.timeout(TIMEOUT)
@settings(FUZZ, max_examples=EXAMPLES or 500)
@given(entries=st.dictionaries(st.text(max_size=12), ENTRY, min_size=1, max_size=5),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), NUMBERS),
                                                      max_size=3)),
       data=st.binary(max_size=96))
def test_generated_safetensors_headers(folder, entries, metadata, data):
    """Headers that lie in every way JSON allows: offsets, shapes and dtypes of any type and size."""
    header: Dict[str, Any] = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, allow_nan=True).encode()  # Python writes NaN/Infinity, which its reader accepts
    _read(folder, struct.pack("<Q", len(text)) + text + data)


# --- a real checkpoint whose tensors lie: detection and loading ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state(folder) -> Dict[str, torch.Tensor]:
    from tests.tiny import write_tiny_checkpoint

    return read_state_dict(write_tiny_checkpoint(folder / "tiny" / "m.safetensors", "sd1", write_yaml=False))


@pytest.fixture(scope="module")
def tiny_folder(folder) -> Path:
    (folder / "tiny").mkdir(exist_ok=True)
    return folder / "tiny"


@pytest.mark.timeout(TIMEOUT)
@settings(FUZZ, max_examples=EXAMPLES or 60, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking:
@given(data=st.data())                                                   # each example builds three models
def test_checkpoints_whose_tensors_lie(tiny_folder, tiny_state, data):
    """A valid tiny SD1 file with tensors removed, reshaped to any rank and size, or cast to other dtypes: only
    CheckpointError may come out of `inspect_checkpoint` and `load_checkpoint`."""
    import warnings

    from imagic.loader import inspect_checkpoint, load_checkpoint
    from safetensors.torch import save_file

    sd = dict(tiny_state)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(sd)))
        change = data.draw(st.sampled_from(["drop", "shape", "dtype"]))
        if change == "drop" and len(sd) > 1:
            del sd[key]
        elif change == "shape":
            sd[key] = torch.zeros(data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 9, 64]), max_size=4)))
        else:
            sd[key] = sd[key].to(data.draw(st.sampled_from([torch.int64, torch.bool, torch.uint8, torch.float16])))
    path = tiny_folder / "lying.safetensors"
    save_file(sd, str(path))
    for read in (lambda: inspect_checkpoint(path, probe=False), lambda: load_checkpoint(path)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read()
        except CheckpointError as e:
            assert "\n" not in str(e)


# --- from_ldm_yaml -------------------------------------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(-3, 1024),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["eps", "v", "x0", "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                     "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "penultimate", "last"]))
YAML_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _check_config(result: Any) -> None:
    """A config that comes out is well typed: its sizes are positive integers and its choices are known."""
    assert isinstance(result, ModelConfig)
    for part in (result.unet, result.vae, result.text):
        hints = typing.get_type_hints(type(part))
        for name, value in vars(part).items():
            if typing.get_origin(hints[name]) is tuple:
                assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value), (name, value)
            elif hints[name] is int:
                assert isinstance(value, int) and not isinstance(value, bool), (name, value)
                assert value >= 1 or (value == -1 and name in ("num_heads", "num_head_channels")), (name, value)
            elif hints[name] is float:  # an integer is a valid float (`dropout: 0`)
                assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)
    assert result.prediction_type in ("epsilon", "v") and result.image_size >= 1
    assert math.isfinite(result.scale_factor) and math.isfinite(result.linear_start)


def _from_yaml(source: Any) -> None:
    try:
        cfg = from_ldm_yaml(source)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return
    _check_config(cfg)


BASES = [to_ldm_yaml(preset(n)) for n in ("sd1", "sd2", "sd2-v")] + [to_ldm_yaml(tiny_config(n))
                                                                     for n in ("sd1", "sd2")]


def _paths(doc: Any, prefix=()) -> List[tuple]:
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(base=st.sampled_from(range(len(BASES))), data=st.data())
def test_mutated_real_configs(folder, base, data):
    """The original SD yamls (and our tiny ones) with values replaced by anything YAML can hold, or deleted."""
    doc = copy.deepcopy(BASES[base])
    for _ in range(data.draw(st.integers(1, 4))):
        paths = _paths(doc)
        if not paths:  # everything was deleted
            break
        path = data.draw(st.sampled_from(paths))
        node = doc
        for key in path[:-1]:
            node = node[key]
        if data.draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = data.draw(YAML_VALUES)
    _from_yaml(doc)
    p = folder / "mutated.yaml"
    p.write_text(yaml.safe_dump(doc))
    _from_yaml(p)


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(doc=YAML_VALUES)
def test_random_yaml_documents(folder, doc):
    p = folder / "random.yaml"
    p.write_text(yaml.safe_dump(doc))
    _from_yaml(p)
    if isinstance(doc, dict):
        _from_yaml(doc)


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_random_text_as_yaml(folder, text):
    p = folder / "text.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    _from_yaml(p)


def _laughs(levels: int = 9) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        prev = "a" if i == 1 else f"l{i - 1}"
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + f"\nmodel: {{params: {{unet_config: {{params: *l{levels - 1}}}}}}}\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["nested_lists", "nested_maps", "billion_laughs", "python_tag", "binary_tag",
                                  "merge_keys", "tabs", "bom_utf16", "directory", "fifo"])
def test_yaml_hazards(folder, name):
    canary = folder / "YAML_CANARY"
    texts = {
        "nested_lists": "[" * 20_000 + "]" * 20_000,
        "nested_maps": "{a: " * 5_000 + "1" + "}" * 5_000,
        "billion_laughs": _laughs(),
        "python_tag": f"model: !!python/object/apply:os.system ['touch {canary}']\n",
        "binary_tag": "model: !!binary aGVsbG8=\n",
        "merge_keys": "base: &b {params: {unet_config: 1}}\nmodel:\n  <<: *b\n",
        "tabs": "model:\n\tparams: 1\n",
    }
    p = folder / f"{name}.yaml"
    if name == "directory":
        p.mkdir(exist_ok=True)
    elif name == "fifo":
        if not p.exists():
            os.mkfifo(p)
    elif name == "bom_utf16":
        p.write_bytes("model: {params: 1}".encode("utf-16"))
    else:
        p.write_text(texts[name])
    with pytest.raises(ConfigError) as ei:
        from_ldm_yaml(p)
    assert "\n" not in str(ei.value)
    assert not canary.exists()
