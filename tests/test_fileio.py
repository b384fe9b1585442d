"""Atomic writes: old content survives failures, no temporary files are left, errors name the path."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import pickle
import os
from pathlib import Path

import pytest
import torch

from imagic import fileio
from imagic.fileio import (OutputError, atomic_path, atomic_write, load_safetensors, read_json,
                           save_safetensors, sha256_file, write_csv, write_json, write_text)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_replaces_content(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        f.write(b"new content")
        assert p.read_bytes() == b"old"  # nothing visible until the block ends
    assert p.read_bytes() == b"new content"
    assert _listing(tmp_path) == ["a.bin"]


def test_writer_raising_midway_keeps_old_content(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("precious")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(p, "w") as f:
            f.write("half of the new")
            f.flush()
            raise RuntimeError("boom")
    assert p.read_text() == "precious"
    assert _listing(tmp_path) == ["a.txt"]


def test_new_file_not_created_on_failure(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_permissions_follow_umask_and_existing_file(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(p, 0o640)
    write_text(p, "y")
    assert p.stat().st_mode & 0o777 == 0o640


class _FullDisk(io.RawIOBase):
    """A file object whose writes fail with ENOSPC after `room` bytes, like a filling disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b)[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("writer", ["json", "safetensors", "csv"])
def test_enospc_becomes_output_error_and_old_file_stays(tmp_path, monkeypatch, writer):
    p = tmp_path / f"out.{writer}"
    p.write_bytes(b"old content")
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        if "w" not in mode or not os.path.basename(file).endswith(".tmp"):
            return real_open(file, mode, *args, **kwargs)
        disk = io.BufferedWriter(_FullDisk(real_open(file, "wb", buffering=0), room=16))
        return disk if "b" in mode else io.TextIOWrapper(disk, encoding="utf-8", newline="")

    monkeypatch.setattr("builtins.open", full_open)
    big = list(range(1000))
    with pytest.raises(OutputError) as ei:
        if writer == "json":
            write_json(p, big)
        elif writer == "safetensors":
            save_safetensors(p, {"w": torch.zeros(1000)})
        else:
            write_csv(p, ["step", "loss"], [[i, 0.5] for i in big])
    monkeypatch.undo()
    msg = str(ei.value)
    assert str(p) in msg and "No space left" in msg and "\n" not in msg
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    assert p.read_bytes() == b"old content"
    assert _listing(tmp_path) == [p.name]


def test_enospc_at_fsync(tmp_path, monkeypatch):
    """Some filesystems (NFS, quotas) only report a full disk when the data is flushed to the device."""
    p = tmp_path / "x.json"
    write_json(p, {"v": 1})

    def fail(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", fail)
    with pytest.raises(OutputError, match="x.json"):
        write_json(p, {"v": 2})
    monkeypatch.undo()
    assert read_json(p) == {"v": 1}
    assert _listing(tmp_path) == ["x.json"]


def test_other_oserror_in_body_passes_through(tmp_path):
    """A missing *input* read inside the block is the caller's error, not an output error."""
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "o.bin"):
            open(tmp_path / "missing-input")
    assert _listing(tmp_path) == []


def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        with pytest.raises(OutputError) as ei:
            write_text(d / "f.txt", "x")
        assert str(d / "f.txt") in str(ei.value) and "\n" not in str(ei.value)
    finally:
        os.chmod(d, 0o700)


def test_missing_directory_is_output_error(tmp_path):
    target = tmp_path / "no" / "such" / "f.json"
    with pytest.raises(OutputError, match="No such file") as ei:
        write_json(target, {})
    assert str(target) in str(ei.value) and "\n" not in str(ei.value)


def test_permission_error_at_replace(tmp_path, monkeypatch):
    """Covers an unwritable destination even when running as root (where chmod cannot simulate it)."""
    p = tmp_path / "f.txt"
    p.write_text("old")

    def deny(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fileio.os, "replace", deny)
    with pytest.raises(OutputError, match="Permission denied"):
        write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert _listing(tmp_path) == ["f.txt"]


def test_atomic_path_for_path_writers(tmp_path):
    p = tmp_path / "t.pt"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp != p
        torch.save({"a": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2))
    assert _listing(tmp_path) == ["t.pt"]


def test_json_round_trip_and_bad_json(tmp_path):
    obj = {"alpha": [0.9, 1.1], "prompt": "a dog \u00e9", "n": None}
    write_json(tmp_path / "a.json", obj)
    assert read_json(tmp_path / "a.json") == obj
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        read_json(tmp_path / "bad.json")


def append_csv_row(path: Path, header, row) -> None:
    """A CSV log a row at a time, the header first when the file is new; a different header is refused."""
    header_line = ",".join(header) + "\n"
    with open(path, "a+", encoding="utf-8", newline="") as f:
        f.seek(0)
        first = f.readline()
        if first and first != header_line:
            raise ValueError(f"{path}: existing CSV header {first.strip()!r} != {header_line.strip()!r}")
        f.seek(0, os.SEEK_END)
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(row)
        f.write(("" if first else header_line) + out.getvalue())


def test_csv_write_and_append(tmp_path):
    p = tmp_path / "loss.csv"
    write_csv(p, ["step", "loss"], [[0, 1.5], [1, 1.25]])
    assert p.read_text() == "step,loss\n0,1.5\n1,1.25\n"
    log = tmp_path / "log.csv"
    append_csv_row(log, ["step", "loss"], [0, 2.0])
    append_csv_row(log, ["step", "loss"], [1, "a,b"])
    assert log.read_text() == 'step,loss\n0,2.0\n1,"a,b"\n'
    with pytest.raises(ValueError, match="header"):
        append_csv_row(log, ["step", "lr"], [2, 0.1])


def test_safetensors_round_trip_with_metadata(tmp_path):
    p = tmp_path / "e.safetensors"
    tensors = {"emb": torch.randn(1, 77, 8), "half": torch.randn(3, 2).half(), "bf": torch.randn(4).bfloat16(),
               "view": torch.randn(4, 6)[:, ::2]}
    save_safetensors(p, tensors, {"alpha": 0.9, "prompt": "a photo", "steps": [1, 2]})
    out, meta = load_safetensors(p)
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    assert meta == {"alpha": "0.9", "prompt": "a photo", "steps": "[1, 2]"}
    save_safetensors(p, {"x": torch.zeros(1)})
    assert load_safetensors(p)[1] == {}
    assert _listing(tmp_path) == ["e.safetensors"]


def test_loaded_tensors_are_held_at_torch_alignment(tmp_path):
    """Tensors read from a file sit in torch's own 64-byte aligned memory, wherever the file put their data (here
    8 bytes past a 16-byte boundary, as a header of the right length does): CPU BLAS chooses kernels, and so
    rounding, by alignment, and a run resumed from files must compute as the run that held them in memory."""
    from safetensors.torch import load_file, save_file

    e = torch.randn(1, 77, 64)
    p = tmp_path / "e.safetensors"
    pad = next(n for n in range(64) if _data_address(save_file, load_file, p, e, n) % 16 == 8)
    save_file({"embedding": e}, str(p), metadata={"pad": "x" * pad})
    out = load_safetensors(p)[0]["embedding"]
    assert torch.equal(out, e) and out.data_ptr() % 64 == 0


def _data_address(save_file, load_file, path, tensor, pad: int) -> int:
    save_file({"embedding": tensor}, str(path), metadata={"pad": "x" * pad})
    return load_file(str(path))["embedding"].data_ptr()


@pytest.mark.parametrize("n", [0, 1, 1000, (1 << 10) * 3 + 7])
def test_sha256_matches_hashlib(tmp_path, n):
    data = os.urandom(n)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p, chunk=1 << 10) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_output_error_pickles(tmp_path):
    """Errors cross process boundaries (multiprocessing, DataLoader workers) intact."""
    with pytest.raises(OutputError) as ei:
        write_text(tmp_path / "missing-dir" / "x.txt", "x")
    again = pickle.loads(pickle.dumps(ei.value))
    assert type(again) is OutputError and again.errno == errno.ENOENT and str(again) == str(ei.value)
