"""The card container (card/container): parsing limits, and files written
straight from the tensors."""

import os
import threading

import numpy as np
import pytest

from qkvshare_mlx.card import container
from qkvshare_mlx.card.container import json_depth
from qkvshare_mlx.errors import CardFormatError


def test_depth_limit_is_exact():
    nested = 1
    for _ in range(5):
        nested = [nested]
    assert json_depth(nested, 5) == 5
    with pytest.raises(CardFormatError):
        json_depth(nested, 4)
    assert json_depth({"a": [], "b": {"c": 1}}, 2) == 2


TENSORS = {
    "b": np.arange(1000, dtype=np.float16).reshape(10, 100),
    "a": np.arange(77, dtype=np.uint32),
    "c": np.zeros(0, np.int32),
    # a strided view: written as its C-order bytes, like write()
    "d": np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::2],
}


def _meta(digest: str) -> dict:
    return {"kind": "test", "sha256": digest, "mac": digest[::-1]}


def _write(path, tensors, metadata=_meta):
    return container.write_tensors_file(
        path, tensors, metadata, domain="test/1", meta=b'{"m":1}'
    )


def test_written_file_equals_write_and_hashes_on_another_thread(tmp_path, monkeypatch):
    threads = []
    digest = container.digest

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return digest(*args, **kwargs)

    monkeypatch.setattr(container, "digest", recording)
    path = _write(tmp_path / "t.st", TENSORS)
    data = path.read_bytes()
    checksum = digest("test/1", b'{"m":1}', TENSORS)
    assert data == container.write(TENSORS, _meta(checksum))
    assert threads and threads[0] != threading.get_ident()
    header = container.read_header(data, len(data))
    assert header.metadata["sha256"] == checksum
    views = container.tensor_views(data, header)
    for name, arr in TENSORS.items():
        np.testing.assert_array_equal(views[name], arr)
    assert os.listdir(tmp_path) == ["t.st"]


def test_metadata_that_changes_length_is_refused_and_leaves_no_file(tmp_path):
    target = tmp_path / "t.st"
    target.write_bytes(b"old")

    def grows(digest):  # longer once the real digest is known
        return {"sha256": digest, "extra": "x" * (8 * (digest != "0" * 64))}

    with pytest.raises(ValueError, match="does not fit"):
        _write(target, TENSORS, grows)
    assert os.listdir(tmp_path) == ["t.st"]
    assert target.read_bytes() == b"old"


def test_a_failing_checksum_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "t.st"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError(5, "read error")

    monkeypatch.setattr(container, "digest", broken)
    with pytest.raises(OSError, match="read error"):
        _write(target, TENSORS)
    assert os.listdir(tmp_path) == ["t.st"]
    assert target.read_bytes() == b"old"


def test_an_unsupported_dtype_is_refused_before_anything_is_written(tmp_path):
    bad = {"x": np.zeros(3, np.complex64)}
    with pytest.raises(CardFormatError, match="unsupported dtype"):
        _write(tmp_path / "t.st", bad)
    assert os.listdir(tmp_path) == []


def test_pieces_write_and_hash_as_their_concatenation(tmp_path):
    parts = (np.arange(5, dtype=np.uint32), np.zeros(0, np.uint32), np.arange(3, 9))
    parts = parts[:2] + (parts[2].astype(np.uint32).reshape(2, 3)[:, ::-1],)
    pieces = {"p": container.Pieces(parts, np.dtype(np.uint32)), "q": TENSORS["b"]}
    joined = {"p": np.concatenate([x.reshape(-1) for x in parts]), "q": TENSORS["b"]}
    meta = {"kind": "test"}
    assert container.write(pieces, meta) == container.write(joined, meta)
    assert container.digest("d", b"m", pieces) == container.digest("d", b"m", joined)
    path = _write(tmp_path / "t.st", pieces)
    checksum = container.digest("test/1", b'{"m":1}', joined)
    assert path.read_bytes() == container.write(joined, _meta(checksum))
    empty = container.Pieces((), np.dtype(np.float16))
    assert empty.shape == (0,) and empty.nbytes == 0
    with pytest.raises(ValueError, match="float16"):
        container.Pieces((np.zeros(2, np.float32),), np.dtype(np.float16))


def test_many_small_pieces_are_written_and_hashed_in_blocks(tmp_path, monkeypatch):
    # small parts are joined into blocks for the two threads; the bytes stay
    monkeypatch.setattr(container, "_BLOCK", 1000)
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2**32, n, dtype=np.uint32) for n in (7, 300, 1, 90) * 9]
    parts.insert(5, rng.integers(0, 2**32, 20_000, dtype=np.uint32))  # a large one
    pieces = {"p": container.Pieces(tuple(parts), np.dtype(np.uint32))}
    blocks = container._chunks(pieces["p"], blocks=True)
    assert 2 < len(blocks) < len(parts)
    joined = {"p": np.concatenate(parts)}
    assert b"".join(blocks) == joined["p"].tobytes()
    path = _write(tmp_path / "t.st", pieces)
    checksum = container.digest("test/1", b'{"m":1}', joined)
    assert path.read_bytes() == container.write(joined, _meta(checksum))
