"""Crash-safe file writes: a run directory never holds a half-written file.

Every output (images, embeddings, LoRA weights, configs, loss curves) is written to a temporary file in the
destination's directory, flushed and fsync'ed, then moved over the destination with `os.replace`, which is
atomic on POSIX and Windows when source and destination are on the same filesystem (hence the same directory).
A crash, a full disk or an exception in the writer leaves the previous file untouched and removes the
temporary one.

Write failures (full disk, read-only or unwritable directory, ...) surface as `OutputError`, a subclass of
`OSError` whose one-line message names the destination path.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import stat
import struct
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
from safetensors import safe_open

PathLike = Union[str, os.PathLike]

# errnos that mean "the output could not be written" when they come out of the writer's own code (a write into
# the temporary file); other OSErrors from inside a `with atomic_write(...)` body are the caller's and pass through.
_WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EIO, errno.EROFS,
                 errno.EACCES, errno.EPERM}


class OutputError(OSError):
    """An output file could not be written; the message is one line naming the path and the reason."""


def _output_error(path: PathLike, cause: OSError) -> OutputError:
    reason = " ".join((cause.strerror or str(cause) or type(cause).__name__).split())
    message = f"cannot write {os.fspath(path)}: {reason}"
    return OutputError(message) if cause.errno is None else OutputError(cause.errno, message)


# `_create_temp`'s names: a crash between creating and renaming (kill -9, power loss) leaves one of these behind.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _create_temp(path: Path) -> Path:
    """Create an empty, exclusively owned temporary file next to `path`.

    `os.open(..., 0o666)` lets the umask pick the permissions, as a plain `open()` would (`tempfile.mkstemp`
    would force 0600 on every output). The leading dot keeps it out of casual directory listings.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(directory: PathLike) -> int:
    """Delete the temporary files that killed writers left in `directory`; returns how many.

    Only safe while no other process writes there: run directories call it while holding their lock.
    """
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                _remove_quietly(Path(entry.path))
                removed += 1
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself. Best effort: some filesystems (and Windows) cannot open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is fsync'ed and moved onto `path`.

    For writers that need a file name rather than a file object. They must not infer a format from the
    name: the temporary one ends in `.tmp`. On any exception the temporary file is removed, `path` keeps
    its previous content, and write failures (full disk, permissions, ...) become `OutputError`.
    """
    path = Path(path)
    try:
        tmp = _create_temp(path)
    except OSError as e:
        raise _output_error(path, e) from e
    try:
        yield tmp
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError) and e.errno in _WRITE_ERRNOS:
            raise _output_error(path, e) from e
        raise
    try:
        if path.exists():  # keep the permissions of the file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _output_error(path, e) from e
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on success it atomically replaces `path`.

    `mode` is "wb" (bytes) or "w" (UTF-8 text, universal newlines off so CSV writers control line ends).
    The file is flushed and closed before the move, so errors that only show at flush time (a full disk
    with buffered writes) are raised here as `OutputError` and the old file stays.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_text(path: PathLike, s: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_write(path, "w") as f:
        f.write(s)


def write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (plus a final newline) atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a syntax error becomes a ValueError that names the file."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: invalid JSON: {e}") from e


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a whole CSV file atomically (loss curves: rewritten as they grow, never left half-written)."""
    write_text(path, _csv_text([list(header), *rows]))


def save_safetensors(path: PathLike, tensors: Dict[str, torch.Tensor],
                     metadata: Optional[Dict[str, Any]] = None) -> None:
    """Save tensors (and string metadata; other values are JSON-encoded) as .safetensors, atomically.

    The file is serialised in memory and written through `atomic_write` rather than with `save_file`, whose
    I/O errors arrive as a non-OSError `SafetensorError` (and which reports nothing when writing to /dev/full).
    The cost is one extra copy of the file in memory while saving. Tensors sharing storage must be cloned by
    the caller: safetensors refuses aliasing, which would otherwise double-save or silently untie weights.
    Equal tensors and metadata give equal bytes (see `_sorted_metadata`).
    """
    meta = None if metadata is None else {str(k): v if isinstance(v, str) else json.dumps(v)
                                          for k, v in metadata.items()}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = _sorted_metadata(safetensors.torch.save(cpu, metadata=meta))
    with atomic_write(path) as f:
        f.write(data)


def _sorted_metadata(blob: bytes) -> bytes:
    """safetensors writes `__metadata__` in hash-map order, which differs from one call to the next: sort it, so
    that a resumed run's LoRA file is byte-identical to an uninterrupted run's (and their sha256 agree).

    The header is JSON padded with spaces to a multiple of 8 bytes; tensor offsets count from the end of the
    header, so rewriting it leaves the data as it is.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    if len(header.get("__metadata__") or {}) < 2:
        return blob
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


class _KeepWriteError:
    """A file object that remembers the OSError of a failed write before the caller turns it into something else."""

    def __init__(self, f: IO[bytes]):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(path: PathLike, obj: Any) -> None:
    """torch.save, atomically, with write failures (full disk, size limits) raised as OutputError.

    torch's zip writer reports a failed write as a RuntimeError ("basic_ios::clear: iostream error",
    "unexpected pos ...") that has lost the errno; writing through a file object that keeps the OSError lets
    us raise the real cause instead.
    """
    with atomic_write(path) as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def load_safetensors(path: PathLike, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Load every tensor of a .safetensors file and its metadata (an empty dict when it has none).

    Each tensor is copied into memory of torch's own, 64-byte aligned like every tensor a run computes, rather than
    left where the reader puts it (at the file's data offset: 8-byte aligned at best). CPU BLAS picks its kernels
    by the alignment of its inputs: on a 2-core AMD EPYC with MKL, a (77, 64) input 8 bytes past a 16-byte boundary
    gives a rank-4 LoRA projection other bits, so a stage 2 resumed on e_opt read from its file came out 8.6e-7
    away from the uninterrupted run. Aligned, a resumed run computes on the same bytes at the same alignment."""
    with safe_open(os.fspath(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in `chunk`-byte pieces so multi-GB checkpoints never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
