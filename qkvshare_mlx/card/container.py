"""The safetensors container, written and read as hostile bytes.

A public, numpy-only API over the file layout a card uses (safetensors:
an 8-byte little-endian header length, a JSON header, then the tensor
bytes), with every check a reader of untrusted files needs:

- :func:`read_header` parses the header and checks every claimed dtype,
  shape and offset against the file size and a byte cap *before* any array
  exists; tensors must tile the data region exactly (no overlaps, gaps or
  trailing bytes, none of which the checksum would cover);
- :func:`parse_json` refuses duplicate keys, NaN/Infinity, overflowing
  numbers, deep nesting and dense container soup;
- :func:`tensor_views` returns zero-copy numpy views of a checked header;
- :func:`write` is the inverse; :func:`digest` the checksum over metadata
  and tensors (a card's ``sha256``); :func:`write_tensors_file` writes a
  file with such a checksum in its header straight from the tensors,
  hashing while it writes.

It knows nothing about what the tensors mean (see :mod:`.schema`), so it
also serves third-party tools and :mod:`qkvshare_mlx.testing`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import SAFETENSORS, safetensors_code
from ..errors import CardFormatError, CardTooLargeError

MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 32  # containers enclosing any value (see json_depth)
JSON_CHARS_PER_CONTAINER = 8
MAX_RANK = 8
MAX_DIM = 2**40
_ITEMSIZE = {k: v.itemsize for k, v in SAFETENSORS.items()}


@dataclass
class Header:
    """A checked safetensors header.

    Attributes:
        metadata: the ``__metadata__`` map of strings.
        tensors: per tensor name, ``{"dtype", "shape", "data_offsets"}``.
        base: byte offset of the data region in the file.
        data_len: bytes in the data region.
    """

    metadata: dict[str, str]
    tensors: dict[str, dict]
    base: int
    data_len: int


@dataclass(frozen=True)
class Pieces:
    """A 1-D tensor written as consecutive pieces, never joined in memory.

    Its bytes are those of ``parts`` (arrays of ``dtype``, each read in C
    order) one after the other: what ``np.concatenate`` of the flattened
    parts would hold. :func:`write`, :func:`write_tensors_file` and
    :func:`digest` take it wherever they take an array.
    """

    parts: tuple[np.ndarray, ...]
    dtype: np.dtype

    def __post_init__(self):
        for p in self.parts:
            if p.dtype != self.dtype:
                raise ValueError(f"Pieces of {self.dtype}: got a part of {p.dtype}")

    @property
    def shape(self) -> tuple[int]:
        return (sum(int(p.size) for p in self.parts),)

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)


# Below this size, consecutive parts are joined into blocks of about
# _BLOCK bytes before they are hashed or written: a hash update or a file
# write per small part, on two threads at once, spends its time passing
# the GIL instead of releasing it.
_SMALL = 1 << 16
_BLOCK = 1 << 20


def _chunks(tensor, *, blocks: bool = False) -> list:
    """The bytes of an array or :class:`Pieces`, in order; with ``blocks``,
    small consecutive parts joined (see ``_SMALL``)."""
    parts = tensor.parts if isinstance(tensor, Pieces) else (tensor,)
    raw = [_raw(p) for p in parts]
    if not blocks or len(raw) < 2:
        return raw
    out, group, size = [], [], 0
    for chunk in raw:
        if chunk.nbytes >= _SMALL:
            if group:
                out.append(b"".join(group))
                group, size = [], 0
            out.append(chunk)
            continue
        group.append(chunk)
        size += chunk.nbytes
        if size >= _BLOCK:
            out.append(b"".join(group))
            group, size = [], 0
    if group:
        out.append(b"".join(group))
    return out


def check_tiling(header: Header) -> None:
    """Refuse gaps between tensors and bytes after the last one.

    Neither is covered by a checksum over the tensors, and safetensors
    itself refuses both; :func:`read_header` already refused overlaps.
    Separate so a reader can first report a missing or extra tensor.
    """
    at = 0
    for start, end, name in sorted(
        (*info["data_offsets"], name) for name, info in header.tensors.items()
    ):
        if start != at:
            raise CardFormatError(
                f"{name}: starts at data byte {start}, expected {at} (no gaps "
                "between tensors)"
            )
        at = end
    if at != header.data_len:
        raise CardFormatError(
            f"{header.data_len - at} trailing bytes after the last tensor "
            "(expected none)"
        )


def canonical_json(obj) -> bytes:
    """The canonical JSON bytes that are hashed (sorted keys, no spaces)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def json_depth(obj, limit: int = MAX_JSON_DEPTH) -> int:
    """How many containers (objects, arrays) enclose the deepest value of a
    parsed JSON document: 0 for a bare scalar, 1 for ``[1]`` or ``{}``'s
    members. Raise CardFormatError past ``limit``. Level by level, no
    recursion: a card's metadata has tens of thousands of values."""
    level, depth = [obj], 0
    while level:
        if depth > limit:
            raise CardFormatError(f"metadata JSON nests deeper than {limit} levels")
        nxt = []
        for o in level:
            if type(o) is dict:
                nxt.extend(o.values())
            elif type(o) is list:
                nxt.extend(o)
        level, depth = nxt, depth + 1
    return depth - 1


def _unique_keys(pairs):
    # json.loads keeps the last of duplicate keys, other parsers the first: a
    # card with duplicates reads differently in different readers, so refuse it.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise CardFormatError(f"duplicate JSON key {key!r:.60}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise CardFormatError(
        f"JSON constant {name} not allowed (expected a finite number)"
    )


def _finite_float(text):
    value = float(text)
    if not np.isfinite(value):
        raise CardFormatError(f"JSON number {text[:40]} overflows a float")
    return value


def parse_json(text: str, what: str, *, max_depth: int = MAX_JSON_DEPTH):
    """Parse untrusted JSON text; every failure is a CardFormatError naming ``what``."""
    # Objects and arrays cost ~60-200 bytes each once parsed; a card's JSON has
    # about one per 30 characters. Refuse dense container soup before parsing,
    # so a small file cannot make the parser allocate 20x its size.
    containers = text.count("{") + text.count("[")
    if containers > len(text) // JSON_CHARS_PER_CONTAINER + 256:
        raise CardFormatError(
            f"{what}: {containers} JSON objects/arrays in {len(text)} characters, "
            f"expected at most one per {JSON_CHARS_PER_CONTAINER}"
        )
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except CardFormatError as e:
        raise CardFormatError(f"{what}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CardFormatError(f"{what}: not valid JSON ({type(e).__name__})") from None
    try:
        json_depth(obj, max_depth)
    except CardFormatError as e:
        raise CardFormatError(f"{what}: {e}") from None
    return obj


def _sizes(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_RANK
        and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM
            for d in value
        )
    )


def _check_entry(name: str, info) -> tuple[str, list, int, int]:
    if not isinstance(info, dict):
        raise CardFormatError(f"{name}: tensor entry is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS:
        raise CardFormatError(
            f"{name}: dtype {dtype!r:.60} not one of {sorted(SAFETENSORS)}"
        )
    if not _sizes(shape):
        raise CardFormatError(
            f"{name}: shape {shape!r:.60} is not a list of at most {MAX_RANK} "
            "sizes < 2^40"
        )
    if not (
        isinstance(offs, list)
        and len(offs) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
    ):
        raise CardFormatError(f"{name}: data_offsets {offs!r:.60} is not [start, end]")
    return dtype, shape, offs[0], offs[1]


def read_header(buf, max_bytes: int) -> Header:
    """Parse and check the header of safetensors bytes.

    Args:
        buf: the whole file (bytes or memoryview).
        max_bytes: refuse files, headers or tensors claiming more bytes.

    Raises:
        CardFormatError: anything malformed; CardTooLargeError: over the cap.
    """
    buf = memoryview(buf)
    size = len(buf)
    if size > max_bytes:
        raise CardTooLargeError(f"card is {size} bytes, cap is {max_bytes}")
    if size < 8:
        raise CardFormatError(
            f"file is {size} bytes, too short for a safetensors header"
        )
    (n,) = struct.unpack("<Q", buf[:8])
    if n > size - 8:
        raise CardFormatError(f"header length {n} exceeds the file size {size}")
    if n > min(MAX_HEADER_BYTES, max_bytes):
        raise CardTooLargeError(
            f"header length {n} exceeds the cap {min(MAX_HEADER_BYTES, max_bytes)}"
        )
    try:
        text = bytes(buf[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise CardFormatError("header is not UTF-8") from None
    header = parse_json(text, "safetensors header")
    if not isinstance(header, dict):
        raise CardFormatError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CardFormatError("__metadata__ missing or not a map of strings")
    data_len = size - 8 - n
    spans, total = [], 0
    for name, info in header.items():
        dtype, shape, start, end = _check_entry(name, info)
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        total += nbytes
        if total > max_bytes:
            raise CardTooLargeError(
                f"tensors claim more than the cap of {max_bytes} bytes"
            )
        if not (0 <= start <= end <= data_len) or end - start != nbytes:
            raise CardFormatError(
                f"{name}: data_offsets {[start, end]} do not fit shape {shape} of "
                f"{dtype} inside {data_len} data bytes"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CardFormatError(f"tensors {n0} and {n1} overlap")
    return Header(meta, header, 8 + n, data_len)


def tensor_views(buf, header: Header) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of every tensor of a checked header."""
    buf = memoryview(buf)
    out = {}
    for name, info in header.tensors.items():
        s, e = info["data_offsets"]
        arr = np.frombuffer(
            buf[header.base + s : header.base + e], dtype=SAFETENSORS[info["dtype"]]
        )
        out[name] = arr.reshape(info["shape"])
    return out


def digest(domain: str, meta: bytes, tensors: dict, *, chunks=None) -> str:
    """SHA-256 (hex) over a domain tag, metadata bytes and tensors by name
    (arrays or :class:`Pieces`).

    Each tensor contributes ``name|dtype|[shape]`` and its C-order bytes, all
    length-prefixed (little-endian uint64), in sorted name order.

    ``chunks``: name -> the tensor's bytes as a list of buffers, where the
    caller already has them (see :func:`write_tensors_file`).
    """
    h = hashlib.sha256()
    h.update(f"{domain}\n".encode())
    h.update(struct.pack("<Q", len(meta)))
    h.update(meta)
    for name in sorted(tensors):
        arr = tensors[name]
        desc = f"{name}|{safetensors_code(arr.dtype)}|{list(arr.shape)}".encode()
        h.update(struct.pack("<Q", len(desc)))
        h.update(desc)
        h.update(struct.pack("<Q", arr.nbytes))
        for chunk in _chunks(arr) if chunks is None else chunks[name]:
            h.update(chunk)
    return h.hexdigest()


def digest_during(
    domain: str, meta: bytes, tensors: dict, work, *, chunks=None
) -> tuple[str, Any, Exception | None]:
    """:func:`digest` on a worker thread (hashlib releases the GIL) while
    ``work()`` runs here on the same read-only tensors (``chunks``: see
    :func:`digest`).

    Returns:
        ``(digest, result, error)``: ``work``'s result, or the exception it
        raised (returned, not raised, so the caller can report a checksum
        mismatch first).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(digest, domain, meta, tensors, chunks=chunks)
        try:
            result, error = work(), None
        except Exception as e:  # the caller decides what to report first
            result, error = None, e
        return hashing.result(), result, error


def _layout(tensors: dict, metadata: dict[str, str]):
    """The file's first bytes (header length and JSON header, padded with
    spaces to a multiple of 8) and the tensor names in data order (sorted)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        code = safetensors_code(arr.dtype)
        if code is None:
            raise CardFormatError(f"{name}: unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob, names


def _raw(arr: np.ndarray) -> memoryview:
    return np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data


def write(tensors: dict, metadata: dict[str, str]) -> bytes:
    """Safetensors bytes: tensors (arrays or :class:`Pieces`) in sorted name
    order, no gaps, header padded with spaces to a multiple of 8 bytes."""
    prefix, names = _layout(tensors, metadata)
    return b"".join([prefix] + [c for n in names for c in _chunks(tensors[n])])


# the hex digits of a SHA-256 (what a header's checksum fields hold)
_HEX_DIGEST = "0" * (2 * hashlib.sha256().digest_size)


def write_file(path, data: bytes) -> Path:
    """Write ``data`` atomically: temp file in the same folder, fsync, rename.

    The file gets the permissions ``open()`` would give it (0o666 less the
    umask), so an agent running as another user can read a card meant for
    it where the umask allows. A failure leaves no partial file behind.
    """
    return _atomic(path, lambda f: f.write(data))


def write_tensors_file(path, tensors: dict, metadata, *, domain: str, meta: bytes):
    """Write a safetensors file whose header holds the :func:`digest` of its
    tensors, atomically (as :func:`write_file`), never assembled in memory.

    The tensor bytes go straight to the file while the digest is computed on
    a worker thread (hashlib and file writes release the GIL); the header is
    written last, in the room left for it. The file equals
    ``write(tensors, metadata(digest(domain, meta, tensors)))`` byte for byte.

    Args:
        path: the file.
        tensors: name -> array or :class:`Pieces`.
        metadata: ``metadata(checksum)``: the header's ``__metadata__`` for a
            digest of 64 hex digits; its length must not depend on the
            digest's value (fields derived from it are fixed-length hex).
        domain, meta: the digest's domain tag and metadata bytes.

    Returns:
        ``path`` as a Path.
    """
    room, names = _layout(tensors, metadata(_HEX_DIGEST))
    # the bytes as blocks, made once here: each thread then only passes
    # large buffers to C code that releases the GIL
    chunks = {name: _chunks(tensors[name], blocks=True) for name in names}

    def body(f):
        def write_data():
            f.seek(len(room))
            for name in names:
                for chunk in chunks[name]:
                    f.write(chunk)

        checksum, _, error = digest_during(
            domain, meta, tensors, write_data, chunks=chunks
        )
        if error is not None:
            raise error
        prefix, _ = _layout(tensors, metadata(checksum))
        if len(prefix) != len(room):  # a caller's bug, never the data's
            raise ValueError(
                f"header of {len(prefix)} bytes does not fit the {len(room)} "
                "left for it: metadata() must not change length with the digest"
            )
        f.seek(0)
        f.write(prefix)

    return _atomic(path, body)


def _atomic(path, body) -> Path:
    """Run ``body(f)`` on a temp file beside ``path`` (0o666 less the umask),
    fsync, rename onto ``path``; on any failure remove the temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0o600
        with os.fdopen(fd, "wb") as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it: set, then restore
    os.umask(mask)
    return mask
