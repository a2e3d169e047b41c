"""The error contract of score files (docs/errors.md): anything that is not a valid score file
is a ``ScoreFileError`` with a reason, and ``save`` never damages an existing file."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import scio
from scio import serialization
from scio.serialization import FORMAT_VERSION, ScoreFileError, load_score
from tests.catalogue import CATALOGUE, Entry
from tests.contract_support import fitted, shared_net

ENTRIES = [pytest.param(entry, id=entry.name) for entry in CATALOGUE]


def _knn_file(tmp_path: Path) -> Path:
    path = tmp_path / "knn.pt"
    fitted(next(e for e in CATALOGUE if e.name == "KNN")).score.save(path)
    return path


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a score")
    return buffer.getvalue()


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


#: (class of bad file, its bytes given a valid score file's bytes, message pattern)
BAD_FILES: list[tuple[str, Any, str]] = [
    ("random-bytes", lambda good: os.urandom(512), r"not a scio score file: it is not a torch"),
    ("text", lambda good: b"not a score", r"not a torch.save archive \(of another format"),
    ("empty", lambda good: b"", r"not a scio score file: it is empty \(0 bytes\)"),
    ("truncated-half", lambda good: good[: len(good) // 2], r"\(truncated; score files are"),
    ("truncated-tail", lambda good: good[:-7], r"\(truncated; score files are"),
    ("npy", lambda good: _npy_bytes(), r"not a torch.save archive"),
    ("pickle", lambda good: pickle.dumps({"magic": "scio-score"}), r"not a torch.save archive"),
    ("foreign-zip", lambda good: _zip_bytes(), r"not a readable scio score file \(RuntimeError"),
    ("state-dict", lambda good: _torch_bytes(shared_net().state_dict()), r"not a scio score file"),
    ("tensor", lambda good: _torch_bytes(torch.zeros(3)), r"is not a scio score file$"),
    (
        "other-version",
        lambda good: _torch_bytes({"magic": "scio-score", "format_version": FORMAT_VERSION + 1}),
        r"uses scio score format version 2; this scio reads version 1",
    ),
    (
        "missing-entries",
        lambda good: _torch_bytes({"magic": "scio-score", "format_version": FORMAT_VERSION}),
        r"is a damaged scio score file: `class` is nothing",
    ),
]


def _payload(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, weights_only=True)
    return payload


def _edited(good: Path, **changes: Any) -> bytes:
    payload = _payload(good)
    payload.update(changes)
    return _torch_bytes(payload)


DAMAGED: list[tuple[str, dict[str, Any], str]] = [
    ("layers-type", {"layers": "x"}, r"damaged scio score file: `layers` is str"),
    ("layers-items", {"layers": [[1]]}, r"damaged scio score file: bad input shape or layers"),
    ("params", {"params": {"k": 0}}, r"damaged .*KNN parameters or fitted state .*ParamError"),
    ("unknown-param", {"params": {"kk": 1}}, r"damaged .*cannot be restored \(TypeError"),
    ("fitted", {"fitted": {"index": {"__scio_index__": True}}}, r"damaged .*\(KeyError"),
]


def test_every_bad_file_is_a_score_file_error(tmp_path: Path) -> None:
    good = _knn_file(tmp_path)
    good_bytes = good.read_bytes()
    cases = [(name, make(good_bytes), pattern) for name, make, pattern in BAD_FILES]
    cases += [(name, _edited(good, **changes), pattern) for name, changes, pattern in DAMAGED]
    for name, content, pattern in cases:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(ScoreFileError, match=pattern) as info:
            load_score(path, shared_net())
        message = str(info.value)
        assert str(path) in message and len(message) > len(str(path)) + 20, name
        assert isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError):
        load_score(tmp_path / "missing.pt", shared_net())
    with pytest.raises(IsADirectoryError):
        load_score(tmp_path, shared_net())


@pytest.mark.parametrize("entry", ENTRIES)
def test_truncated_files_of_every_score(entry: Entry, tmp_path: Path) -> None:
    fit = fitted(entry)
    path = tmp_path / "score.pt"
    fit.score.save(path)
    good = path.read_bytes()
    for cut in (1, len(good) // 3, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(ScoreFileError, match=r"not a scio score file: it is not a torch"):
            load_score(path, shared_net())


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    score = fitted(next(e for e in CATALOGUE if e.name == "KNN")).score
    other = fitted(next(e for e in CATALOGUE if e.name == "Energy")).score
    path = tmp_path / "score.pt"
    score.save(path)
    saved = path.read_bytes()

    def failing_save(obj: Any, file: Any) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(serialization.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == saved  # the existing file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score.pt"]  # no temporary left
    assert type(load_score(path, shared_net())).__name__ == "KNN"

    other.save(path)  # a successful save replaces it
    assert type(scio.load_score(path, shared_net())).__name__ == "Energy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score.pt"]
    fresh = tmp_path / "plain"
    fresh.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == fresh.stat().st_mode & 0o777  # usual permissions
    with pytest.raises(FileNotFoundError):
        score.save(tmp_path / "no-such-folder" / "score.pt")
