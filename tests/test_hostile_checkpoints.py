"""Hostile and broken checkpoint files through the CLI: `imagic inspect` and `imagic edit` answer each with one
line on stderr and exit code 2; a canary file proves that no payload ran; `edit` writes nothing.

The corpus is generated here (no files are committed): pickles that would run code on load, torch zips with a
swapped or corrupt `data.pkl`, safetensors files that are truncated or whose header lies, files of the wrong
architecture, and things that are not files at all (directories, symlink loops, a FIFO that would block a naive
reader forever, /dev/zero). What each case tried and how it is answered is tabulated in
benchmarks/results/hardening.md.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from imagic.checkpoint import CheckpointError, read_state_dict
from imagic.cli import main
from imagic.config import to_ldm_yaml
from tests.tiny import tiny_config, write_tiny_checkpoint

UNET = "model.diffusion_model."


# --- payloads: each would create the canary file if it were ever unpickled -------------------------------------
class _System:
    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


class _Eval(_System):
    def __reduce__(self):
        return eval, (f"open({str(self.canary)!r}, 'w').close()",)


class _Exec(_System):
    def __reduce__(self):
        return exec, (f"open({str(self.canary)!r}, 'w').close()",)


class _ImportOs(_System):
    def __reduce__(self):
        return builtins.__import__, ("os",)


class _GetSystem(_System):
    """`getattr(__import__('os'), 'system')`: no os global appears in the pickle, only builtins."""

    def __call__(self, *args):  # pickle insists that a REDUCE callable be callable when it is written
        raise AssertionError("never called while writing")

    def __reduce__(self):
        return getattr, (_ImportOs(self.canary), "system")


class _GetattrTrick(_System):
    def __reduce__(self):
        return _GetSystem(self.canary), (f"touch {self.canary}",)


class _NestedReduce(_System):
    """os.system(eval(...)): the argument of one REDUCE is the result of another."""

    def __reduce__(self):
        return os.system, (_EvalString(f"'touch ' + {str(self.canary)!r}"),)


class _EvalString:
    def __init__(self, expr: str):
        self.expr = expr

    def __reduce__(self):
        return eval, (self.expr,)


def _inst_opcode_pickle(canary: Path) -> bytes:
    """Protocol 0's INST opcode calls `os.system` without a GLOBAL opcode a scanner might look for."""
    return b"(S'touch " + str(canary).encode() + b"'\nios\nsystem\n."


def _swap_member(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    """Copy a torch zip, replacing the member that ends in `suffix` (with a correct CRC: a deliberate swap)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            zo.writestr(info, data if info.filename.endswith(suffix) else zi.read(info.filename))
    return dst


def _flip_member_byte(src: Path, dst: Path, suffix: str) -> Path:
    """Copy a torch zip with one byte of a stored member flipped in place: its CRC no longer matches."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zi:
        body = zi.read(next(i for i in zi.infolist() if i.filename.endswith(suffix)))
    at = raw.find(body)
    assert at > 0
    raw[at + len(body) // 2] ^= 0xFF
    dst.write_bytes(bytes(raw))
    return dst


def _safetensors(header: object = None, data: bytes = b"", raw_header: bytes = b"") -> bytes:
    h = raw_header or json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _f32(shape, begin, end) -> Dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


# --- the corpus ---------------------------------------------------------------------------------------------------
Corpus = Dict[str, Tuple[Path, str]]


def _pickles(d: Path, canary: Path) -> Corpus:
    sd = {UNET + "input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    out: Corpus = {}
    for name, payload in [("os_system", _System), ("eval", _Eval), ("exec", _Exec), ("import", _ImportOs),
                          ("getattr_trick", _GetattrTrick), ("nested_reduce", _NestedReduce)]:
        torch.save({"state_dict": sd, "callbacks": payload(canary)}, d / f"{name}.ckpt")
        out[f"pickle_{name}"] = (d / f"{name}.ckpt", "refused")
    torch.save({"state_dict": {UNET + "x": _System(canary)}}, d / "in_state_dict.ckpt")
    out["pickle_in_state_dict"] = (d / "in_state_dict.ckpt", "refused")
    torch.save({"state_dict": sd, "x": _System(canary)}, d / "legacy.ckpt", _use_new_zipfile_serialization=False)
    out["pickle_legacy_format"] = (d / "legacy.ckpt", "refused")
    (d / "raw2.ckpt").write_bytes(pickle.dumps(_System(canary), protocol=2))
    out["pickle_raw_protocol2"] = (d / "raw2.ckpt", "refused")
    (d / "raw4.ckpt").write_bytes(pickle.dumps(_Exec(canary), protocol=4))
    out["pickle_raw_protocol4"] = (d / "raw4.ckpt", "refused")
    (d / "inst.ckpt").write_bytes(b"\x80\x02" + _inst_opcode_pickle(canary))
    out["pickle_inst_opcode"] = (d / "inst.ckpt", "refused")
    good = d / "good.ckpt"
    torch.save({"state_dict": sd}, good)
    for proto in (2, 4):
        _swap_member(good, d / f"swapped{proto}.ckpt", "data.pkl", pickle.dumps(_System(canary), protocol=proto))
        out[f"zip_data_pkl_swapped_protocol{proto}"] = (d / f"swapped{proto}.ckpt", "refused")
    _swap_member(good, d / "swapped_inst.ckpt", "data.pkl", _inst_opcode_pickle(canary))
    out["zip_data_pkl_swapped_inst_opcode"] = (d / "swapped_inst.ckpt", "refused")
    _flip_member_byte(good, d / "crc.ckpt", "data.pkl")
    out["zip_member_fails_crc"] = (d / "crc.ckpt", "CRC")
    data = good.read_bytes()
    (d / "zip_truncated.ckpt").write_bytes(data[: len(data) * 2 // 3])
    out["zip_truncated"] = (d / "zip_truncated.ckpt", "corrupt")
    (d / "fake.ckpt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    out["zip_fake_signature"] = (d / "fake.ckpt", "corrupt")
    with zipfile.ZipFile(d / "bomb.ckpt", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            for _ in range(48):  # 48 MB of zeros in ~50 KB
                f.write(bytes(1 << 20))
    out["zip_bomb"] = (d / "bomb.ckpt", "zip bomb")
    return out


def _safetensors_files(d: Path, good: Path) -> Corpus:
    blob = good.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + n]
    four = bytes(4)
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = {
        "truncated_half": blob[: len(blob) // 2],
        "truncated_in_header": blob[: 8 + n // 2],
        "only_length_prefix": blob[:8],
        "length_bit_flipped": struct.pack("<Q", n ^ (1 << 40)) + blob[8:],
        "header_quote_bit_flipped": blob[:8] + header.replace(b'"', b"\xa2", 1) + blob[8 + n:],
        "offsets_past_end": _safetensors({"a": _f32([2], 0, 8)}, four),
        "offsets_reversed": _safetensors({"a": _f32([1], 4, 0)}, four * 2),
        "offsets_overlap": _safetensors({"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, four * 3),
        "offsets_infinity": _safetensors(raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}',
                                         data=four),
        "absurd_shape_for_span": _safetensors({"a": _f32([10**6, 10**6], 0, 4)}, four),
        "shape_overflows_u64": _safetensors({"a": _f32([2**62, 2**62], 0, 4)}, four),
        "negative_shape": _safetensors({"a": _f32([-1], 0, 4)}, four),
        "dtype_shape_mismatch": _safetensors({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}, four),
        "unknown_dtype": _safetensors({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, four),
        "huge_header_length": struct.pack("<Q", 2**62) + b'{"a":1}',
        "header_longer_than_file": struct.pack("<Q", 10_000) + b'{"a":{}}',
        "header_not_a_dict": _safetensors(raw_header=b"[1, 2, 3]"),
        "header_trailing_garbage": _safetensors(raw_header=b'{"a":{"dtype":"F32"}} trailing', data=four),
        "entry_not_a_dict": _safetensors({"a": 5}, four),
        "duplicate_keys": _safetensors(raw_header=b'{"a":' + json.dumps(_f32([1], 0, 4)).encode() +
                                       b',"a":' + json.dumps(_f32([2], 0, 8)).encode() + b"}", data=four * 2),
        "nested_100k_deep": _safetensors(raw_header=deep),
        "metadata_not_strings": _safetensors({"__metadata__": {"k": [1]}, "a": _f32([1], 0, 4)}, four),
        "no_tensors": _safetensors({"__metadata__": {"format": "pt"}}),
    }
    needles = {"truncated_half": "truncated", "truncated_in_header": "truncated", "only_length_prefix": "not a",
               "length_bit_flipped": "not a checkpoint", "header_quote_bit_flipped": "not valid JSON",
               "offsets_past_end": "outside the data", "offsets_reversed": "outside the data",
               "offsets_overlap": "overlap", "offsets_infinity": "bad entry", "absurd_shape_for_span": "corrupt",
               "shape_overflows_u64": "corrupt", "negative_shape": "corrupt", "dtype_shape_mismatch": "corrupt",
               "unknown_dtype": "corrupt", "huge_header_length": "not a checkpoint",
               "header_longer_than_file": "truncated", "header_not_a_dict": "not a checkpoint",
               "header_trailing_garbage": "not valid JSON",
               "entry_not_a_dict": "bad entry", "duplicate_keys": "duplicate entry 'a'",
               "nested_100k_deep": "nested too deeply", "metadata_not_strings": "corrupt",
               "no_tensors": "no tensors"}
    out: Corpus = {}
    for name, data in cases.items():
        (d / f"{name}.safetensors").write_bytes(data)
        out[f"safetensors_{name}"] = (d / f"{name}.safetensors", needles[name])
    return out


def _wrong_architecture(d: Path, good: Path) -> Corpus:
    sd = read_state_dict(good)
    files = {
        "sdxl": ({"conditioner.embedders.0.transformer.x": torch.zeros(1), UNET + "input_blocks.0.0.weight":
                  torch.zeros(8, 4, 3, 3)}, "SDXL"),
        "inpainting": ({UNET + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}, "inpainting"),
        "inpainting_with_output": ({UNET + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
                                    UNET + "out.2.weight": torch.zeros(4, 32, 3, 3)}, "inpainting"),
        "diffusers_layout": ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "diffusers-format"),
        "standalone_vae": ({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, "standalone VAE"),
        "lora_file": ({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "LoRA file"),
        "sd3": ({UNET + "joint_blocks.0.x": torch.zeros(1)}, "Stable Diffusion 3"),
        "unrelated_tensors": ({"fc.weight": torch.zeros(2, 2)}, "not a Stable Diffusion checkpoint"),
        "vae_and_text_only": ({k: v for k, v in sd.items() if not k.startswith(UNET)}, "no UNet"),
        "unet_without_cross_attention": ({k: v for k, v in sd.items() if "attn2" not in k}, "cross-attention"),
        "missing_unet_tensor": ({k: v for k, v in sd.items() if k != UNET + "out.2.bias"}, "does not match"),
    }
    out: Corpus = {}
    for name, (tensors, needle) in files.items():
        save_file(tensors, str(d / f"{name}.safetensors"))
        out[f"arch_{name}"] = (d / f"{name}.safetensors", needle)
    # a real tiny checkpoint with a broken yaml beside it (read automatically as <name>.yaml)
    bad_yaml = d / "with_bad_yaml.safetensors"
    bad_yaml.write_bytes(good.read_bytes())
    (d / "with_bad_yaml.yaml").write_text("model: {params: [1, 2\n")
    out["arch_yaml_beside_not_yaml"] = (bad_yaml, "not valid YAML")
    deep_yaml = d / "with_deep_yaml.safetensors"
    deep_yaml.write_bytes(good.read_bytes())
    (d / "with_deep_yaml.yaml").write_text("[" * 50_000 + "]" * 50_000)
    out["arch_yaml_beside_nested_50k"] = (deep_yaml, "nested too deeply")
    typed_yaml = d / "with_typed_yaml.safetensors"
    typed_yaml.write_bytes(good.read_bytes())
    yml = to_ldm_yaml(tiny_config("sd1"))
    yml["model"]["params"]["unet_config"]["params"]["model_channels"] = "thirty-two"
    (d / "with_typed_yaml.yaml").write_text(json.dumps(yml))  # JSON is YAML
    out["arch_yaml_beside_wrong_type"] = (typed_yaml, "model_channels")
    return out


def _not_files(d: Path) -> Corpus:
    out: Corpus = {"missing": (d / "missing.safetensors", "no such file")}
    (d / "empty.safetensors").write_bytes(b"")
    out["empty_file"] = (d / "empty.safetensors", "empty file")
    (d / "notes.ckpt").write_text("these are my notes, not weights\n")
    out["text_file"] = (d / "notes.ckpt", "not a checkpoint")
    Image.new("RGB", (4, 4)).save(d / "photo.ckpt", format="PNG")
    out["png_named_ckpt"] = (d / "photo.ckpt", "not a checkpoint")
    (d / "folder.safetensors").mkdir()
    out["directory"] = (d / "folder.safetensors", "is a directory|not a diffusers model folder")
    (d / "loop.ckpt").symlink_to(d / "loop.ckpt")
    out["symlink_loop"] = (d / "loop.ckpt", "cannot open")
    (d / "ab.ckpt").symlink_to(d / "ba.ckpt")
    (d / "ba.ckpt").symlink_to(d / "ab.ckpt")
    out["symlink_cycle_of_two"] = (d / "ab.ckpt", "cannot open")
    (d / "dangling.ckpt").symlink_to(d / "nowhere.ckpt")
    out["dangling_symlink"] = (d / "dangling.ckpt", "no such file")
    os.mkfifo(d / "pipe.safetensors")  # opening it for reading would block until a writer appears: forever
    out["fifo"] = (d / "pipe.safetensors", "not a regular file")
    if Path("/dev/zero").exists():
        (d / "zero.safetensors").symlink_to("/dev/zero")
        out["dev_zero"] = (d / "zero.safetensors", "not a regular file")
    if Path("/proc/self/status").exists():  # a regular-looking file of size 0 whose reads are generated
        out["proc_pseudo_file"] = (Path("/proc/self/status"), "empty file")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Tuple[Corpus, Path, Path, Path]:
    """(files: name -> (path, what the error must say), canary, a valid input image, a valid checkpoint)."""
    d = tmp_path_factory.mktemp("hostile_ckpt")
    canary = d / "CANARY"
    (d / "good").mkdir()
    good = write_tiny_checkpoint(d / "good" / "tiny.safetensors", "sd1")
    files: Corpus = {}
    files.update(_pickles(d, canary))
    files.update(_safetensors_files(d, good))
    files.update(_wrong_architecture(d, good))
    files.update(_not_files(d))
    image = d / "photo.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(image)
    return files, canary, image, good


CASES = ["pickle_" + n for n in ("os_system", "eval", "exec", "import", "getattr_trick", "nested_reduce",
                                 "in_state_dict", "legacy_format", "raw_protocol2", "raw_protocol4", "inst_opcode")] + \
    ["zip_" + n for n in ("data_pkl_swapped_protocol2", "data_pkl_swapped_protocol4", "data_pkl_swapped_inst_opcode",
                          "member_fails_crc", "truncated", "fake_signature", "bomb")] + \
    ["safetensors_" + n for n in (
        "truncated_half", "truncated_in_header", "only_length_prefix", "length_bit_flipped",
        "header_quote_bit_flipped", "offsets_past_end", "offsets_reversed", "offsets_overlap", "offsets_infinity",
        "absurd_shape_for_span", "shape_overflows_u64", "negative_shape", "dtype_shape_mismatch", "unknown_dtype",
        "huge_header_length", "header_longer_than_file", "header_not_a_dict", "header_trailing_garbage",
        "entry_not_a_dict", "duplicate_keys",
        "nested_100k_deep", "metadata_not_strings", "no_tensors")] + \
    ["arch_" + n for n in ("sdxl", "inpainting", "inpainting_with_output", "diffusers_layout", "standalone_vae",
                           "lora_file", "sd3", "unrelated_tensors", "vae_and_text_only", "unet_without_cross_attention",
                           "missing_unet_tensor", "yaml_beside_not_yaml", "yaml_beside_nested_50k",
                           "yaml_beside_wrong_type")] + \
    ["missing", "empty_file", "text_file", "png_named_ckpt", "directory", "symlink_loop", "symlink_cycle_of_two",
     "dangling_symlink", "fifo", "dev_zero", "proc_pseudo_file"]
# `inspect` reports a file that has the right family but a missing or mis-shaped tensor in full (PROBLEM lines,
# exit 1) instead of stopping at the first error; `edit` must refuse it like the others.
INSPECT_REPORTS = {"arch_missing_unet_tensor": "PROBLEM: unet does not match"}


def _one_line_error(code: int, err: str, needle: str, name: str) -> None:
    assert code == 2, (name, code, err)
    assert err.startswith("imagic: error:") and err.count("\n") == 1, (name, err)
    assert re.search(needle, err), (name, needle, err)
    assert "Traceback" not in err


@pytest.mark.timeout(120)  # a FIFO or /dev/zero read naively would hang; fail instead of stalling the suite
@pytest.mark.parametrize("name", CASES)
def test_inspect_refuses_in_one_line(corpus, name, capsys):
    files, canary, _, _ = corpus
    if name not in files:
        pytest.skip(f"{name}: not available on this system")
    path, needle = files[name]
    code = main(["inspect", "--no-probe", str(path)])
    out, err = capsys.readouterr()
    assert not canary.exists(), f"{name}: the payload ran"
    if name in INSPECT_REPORTS:
        assert code == 1 and INSPECT_REPORTS[name] in out and err == "", (name, out, err)
        return
    _one_line_error(code, err, needle, name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", CASES)
def test_edit_refuses_in_one_line_and_writes_nothing(corpus, name, capsys, tmp_path):
    files, canary, image, _ = corpus
    if name not in files:
        pytest.skip(f"{name}: not available on this system")
    path, needle = files[name]
    out_dir = tmp_path / "run"
    code = main(["edit", "--ckpt", str(path), "--image", str(image), "--prompt", "a photo", "--out", str(out_dir),
                 "--device", "cpu", "--quiet", "--embed-steps", "1", "--finetune-steps", "1", "--steps", "1"])
    err = capsys.readouterr().err
    assert not canary.exists(), f"{name}: the payload ran"
    _one_line_error(code, err, needle if name not in INSPECT_REPORTS else "does not match", name)
    assert not out_dir.exists(), f"{name}: edit wrote into the output directory"


def test_payloads_are_live(corpus, tmp_path):
    """The canary mechanism works: unpickling one payload for real (unsafely, in this test only) creates it."""
    files, canary, _, _ = corpus
    canary2 = tmp_path / "canary2"
    for payload in (_System(canary2), _GetattrTrick(canary2), _NestedReduce(canary2)):
        pickle.loads(pickle.dumps(payload, protocol=2))
        assert canary2.exists()
        canary2.unlink()
    pickle.loads(_inst_opcode_pickle(canary2))
    assert canary2.exists()
    assert not canary.exists()


def test_config_fifo_does_not_hang(corpus, capsys, tmp_path):
    _, canary, _, good = corpus
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    code = main(["inspect", "--no-probe", "--config", str(fifo), str(good)])
    _one_line_error(code, capsys.readouterr().err, "not a regular file", "config fifo")


def test_good_files_still_load(corpus, tmp_path):
    """The guards do not refuse what they should accept: a normal torch zip, a legacy torch file, a re-zipped
    (deflated) one, and safetensors with metadata."""
    files, _, _, _ = corpus
    sd = {UNET + "w": torch.randn(3, 3), "cond_stage_model.b": torch.arange(4)}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, tmp_path / "zip.ckpt")
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "zip.ckpt") as zi, \
            zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    (tmp_path / "meta.safetensors").write_bytes(save(sd, metadata={"format": "pt", "note": "ok"}))
    for name in ("zip.ckpt", "legacy.ckpt", "deflated.ckpt", "meta.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys(), name
        for k in sd:
            assert torch.equal(got[k], sd[k]), (name, k)
    with pytest.raises(CheckpointError):
        read_state_dict(files["safetensors_offsets_overlap"][0])


# --- shapes that lie: detection and loading ---------------------------------------------------------------------
def _lying(good: Path, d: Path, name: str, key: str, make) -> Path:
    sd = read_state_dict(good)
    sd[key] = make(sd[key])
    save_file(sd, str(d / f"{name}.safetensors"))
    return d / f"{name}.safetensors"


LYING = {  # name: (tensor, replacement)
    "unet_conv_in_rank_1": (UNET + "input_blocks.0.0.weight", lambda t: torch.zeros(t.shape[0])),
    "unet_conv_in_zero_channels": (UNET + "input_blocks.0.0.weight", lambda t: torch.zeros(0, *t.shape[1:])),
    "unet_weight_int64": (UNET + "out.2.weight", lambda t: t.to(torch.int64)),
    "vae_weight_bool": ("first_stage_model.encoder.conv_in.weight", lambda t: t.bool()),
}


@pytest.mark.parametrize("command", ["inspect", "edit"])
@pytest.mark.parametrize("name", list(LYING))
def test_tensors_with_lying_shapes_or_dtypes(corpus, tmp_path, capsys, command, name):
    """`inspect` may report such a file (dtypes are shown, problems listed); `edit` must refuse it in one line."""
    _, _, image, good = corpus
    key, make = LYING[name]
    path = _lying(good, tmp_path, name, key, make)
    if command == "inspect":
        code = main(["inspect", "--no-probe", str(path)])
        err = capsys.readouterr().err
        assert code in (0, 1) or (code == 2 and err.count("\n") == 1), (code, err)
        assert "Traceback" not in err
        return
    out_dir = tmp_path / "run"
    code = main(["edit", "--ckpt", str(path), "--image", str(image), "--prompt", "a photo", "--out", str(out_dir),
                 "--device", "cpu", "--quiet", "--embed-steps", "1", "--finetune-steps", "1", "--steps", "1"])
    _one_line_error(code, capsys.readouterr().err, "does not match|dtype|inconsistent", name)
    assert not out_dir.exists()
