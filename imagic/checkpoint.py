"""Reading checkpoint files into a flat state dict, safely.

Two formats: `.safetensors` (preferred: a JSON header plus raw bytes, nothing executable) and `.ckpt` (a PyTorch
zip of pickles, as written by the original LDM / PyTorch Lightning training code). Pickles can run arbitrary code on
load, so `.ckpt` files are opened with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers, plus a short allow-list of the harmless globals that real SD checkpoints carry. Before loading we list
the file's globals without executing anything (`torch.serialization.get_unsafe_globals_in_checkpoint`) and refuse a
file that needs anything outside the allow-list, naming what it asked for.

The format is decided by the file's first bytes, not its extension. Every parser here reads bytes from strangers,
so whatever it raises on a broken file becomes a one-line `CheckpointError` (tests/test_hostile_checkpoints.py and
tests/test_fuzz.py hold the corpus).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import stat
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can read; the message is one line meant for the user."""


class _LightningCallbackStandIn:
    """Stands in for `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.

    SD v1.x `.ckpt` files written by PyTorch Lightning store that class as a dictionary *key* in their `callbacks`
    entry. We never need it, and we do not want to import Lightning, so a plain inert class takes its place: the
    unpickler may create it but no code of it runs.
    """


def _numpy_globals() -> List[Tuple[Callable, str]]:
    """numpy scalars (e.g. Lightning's `best_model_score`) pickle as `multiarray.scalar(dtype, bytes)`."""
    try:
        import numpy as np
    except ImportError:
        return []
    import _codecs

    scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar  # numpy 2 moved core to _core
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        (_codecs.encode, "_codecs.encode"),
    ] + [(type(np.dtype(c)), f"numpy.dtypes.{type(np.dtype(c)).__name__}") for c in "fdlie?"]


def _allowed_globals() -> List[Tuple[Callable, str]]:
    return [(_LightningCallbackStandIn, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")] + \
        _numpy_globals()


def _first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name (EOFError() carries no message)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _sniff_format(path: Path) -> str:
    """'safetensors', 'zip' (torch.save since 1.6) or 'pickle' (legacy torch.save), from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise CheckpointError(f"{path}: empty file")
    if head[:2] == b"PK":
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: legacy torch.save layout
        return "pickle"
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch file)")


def _check_path(path: PathLike) -> Path:
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    except OSError as e:  # symlink loops (ELOOP), permissions on a parent, ...
        raise CheckpointError(f"{p}: cannot open ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{p}: is a directory, expected a .safetensors or .ckpt file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the first read forever, /dev/zero never ends
        raise CheckpointError(f"{p}: not a regular file")
    if st.st_size == 0:  # also /proc-style pseudo-files, whose reads can block or never end
        raise CheckpointError(f"{p}: empty file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: permission denied")
    return p


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys; refuse instead, so no entry escapes the checks below."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_safetensors_header(path: Path) -> dict:
    """Validate the header ourselves first, so a lying header gives a clear message instead of a crash."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        except RecursionError:  # '[[[[...' nested deeper than Python's stack
            raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
        except _DuplicateKey as e:  # two entries for one name: which one a reader takes is up to the reader
            raise CheckpointError(f"{path}: corrupt safetensors header (duplicate entry {e.args[0]!r})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity as an offset
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for {name!r})") from None
        if not 0 <= begin <= end <= data:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file "
                                  f"({name!r} lies outside the data, offsets {begin}..{end} of {data} bytes)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header ({n0!r} and {n1!r} overlap)")
    return header


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({_first_line(e)})") from None
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (no tensors inside)")
    return tensors


def _refusal_reason(e: BaseException) -> str:
    """The line of torch's weights_only error that names what was refused (its first line is boilerplate that
    suggests weights_only=False, which is exactly what must not be done with this file)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), _first_line(e))


def _load_pickle(path: Path, fmt: str) -> object:
    allowed = _allowed_globals()
    stored = False
    if fmt == "zip":
        needed, stored = _check_zip(path)
        refused = sorted(set(needed) - {name for _, name in allowed})
        if refused:
            raise CheckpointError(
                f"{path}: refused: this pickle asks for {', '.join(refused)}, which could run code on load; "
                "only plain tensors are accepted — convert it to .safetensors with a tool you trust")
    try:
        # torch warns about unusual pickle protocols; a hostile file's warnings are noise, its refusal is the news
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=stored)
    except Exception as e:  # the weights_only unpickler raises UnpicklingError, RuntimeError, EOFError, ...
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(f"{path}: refused: the pickle needs objects beyond plain tensors "
                                  f"({_refusal_reason(e)}); convert it to .safetensors with a tool you trust") from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None


def _refuse_zip_bomb(path: Path, z: zipfile.ZipFile) -> None:
    """torch.save writes uncompressed members, so their sizes add up to about the file's size. Readers allocate
    what a member declares, so a few MB of compressed zeros that declare 50 GB would exhaust memory: refuse a
    file whose members expand to more than 4 times its size (re-zipped real weights compress far less than 4x)."""
    size = path.stat().st_size
    total = sum(info.file_size for info in z.infolist())
    if total > 4 * size + (1 << 20):
        raise CheckpointError(f"{path}: refused: its members expand to {total:,} bytes from a {size:,}-byte file "
                              "(a zip bomb?); torch.save never compresses")


def _check_zip(path: Path) -> Tuple[List[str], bool]:
    """(the globals a torch zip's pickle asks for, found without unpickling, after checking every member's CRC;
    whether every member is stored uncompressed).

    torch.load(mmap=True) maps a member's bytes as they lie in the file, so a compressed member (a checkpoint
    re-zipped by some tool) would come back as its compressed bytes read as numbers: mmap only stored files.

    Both steps parse bytes from strangers (Python's zipfile, torch's zip reader, a static pickle scan) and raise
    whatever their parsers raise on a broken file: BadZipFile, zlib.error, UnicodeDecodeError (member names),
    NotImplementedError (compression methods), UnpicklingError (opcodes the scan does not know), EOFError, ...
    """
    try:
        with zipfile.ZipFile(path) as z:
            _refuse_zip_bomb(path, z)
            bad = z.testzip()
            stored = all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt checkpoint (member {bad} fails its CRC check)")
        return torch.serialization.get_unsafe_globals_in_checkpoint(path), stored
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:  # e.g. protocol 4+ opcodes, which torch's safe unpickler cannot read either
        raise CheckpointError(f"{path}: refused: the pickle uses instructions the safe loader does not read "
                              f"({_first_line(e)}); convert it to .safetensors with a tool you trust") from None
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None


def _flatten(obj: object, path: Path) -> StateDict:
    """Unwrap `{"state_dict": ...}` (Lightning) and check that what is left maps names to tensors."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: not a checkpoint (no state dict of tensors inside)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (no tensors inside)")
    return tensors


def read_state_dict(path: PathLike) -> StateDict:
    """Read a `.safetensors` or `.ckpt` file into a flat {name: tensor} dict on the CPU, never running code."""
    p = _check_path(path)
    fmt = _sniff_format(p)
    log.info("reading %s (%s)", p, fmt)
    if fmt == "safetensors":
        return _load_safetensors(p)
    return _flatten(_load_pickle(p, fmt), p)
