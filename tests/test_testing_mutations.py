"""Hostile card bytes: every mutation ends in a CardError or an identical card.

One hypothesis property per mutation category (qkvshare_mlx.testing.mutations), plus a
deterministic test per category that pins the error class and message.
Memory per load is measured with tracemalloc and held to 4x the input + 1 MiB.
"""

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkvshare_mlx.card import CacheCard, container, schema
from qkvshare_mlx.errors import (
    CardError,
    CardFormatError,
    CardIntegrityError,
    CardTooLargeError,
    ModelMismatchError,
)
from qkvshare_mlx.testing import mutations as F

ORIGINAL = F.small_card_bytes(0)
# categories whose every case is invalid: "accepted identical" would be a miss
MUST_REJECT = {
    "flip_payload",
    "truncate",
    "header_length_lie",
    "huge_shape",
    "wrong_dtype",
    "non_utf8_header",
    "empty_file",
    "garbage_json",
    "duplicate_keys",
} | {c for c in F.MUTATIONS if c.startswith("forged_")}


def _load(data, **kwargs):
    return CacheCard.from_bytes(data, expect=F.FINGERPRINT, **kwargs)


def _raises(data, cls, *words, **kwargs):
    with pytest.raises(cls) as info:
        _load(data, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    return info.value


# ----------------------------------------------------------------------------
# Properties, one per category


@pytest.mark.parametrize("category", sorted(F.MUTATIONS))
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutation_is_rejected_or_identical(category, seed):
    _, data = F.mutate(ORIGINAL, np.random.default_rng(seed), category)
    out = F.load_outcome(ORIGINAL, data, expect=F.FINGERPRINT)
    assert out.kind in ("error", "identical"), (category, out)
    if category in MUST_REJECT:
        assert out.kind == "error", (category, out)
    if out.kind == "error":
        assert out.message and len(out.message) < 400
    assert out.peak_bytes <= F.memory_cap(len(data)), (category, out.peak_bytes)
    assert out.seconds < 5.0  # generous: 2 shared cores; a hang is minutes


# ----------------------------------------------------------------------------
# Deterministic cases


def test_valid_card_round_trips_bit_exactly():
    card = _load(ORIGINAL)
    assert card.to_bytes() == ORIGINAL
    assert card.n_tokens == 48 and len(card.layers) == 2


def test_every_sampled_payload_byte_flip_is_detected():
    _, hi = F.region(ORIGINAL)
    rng = np.random.default_rng(1)
    positions = rng.choice(np.arange(hi, len(ORIGINAL)), size=200, replace=False)
    for i in positions:
        data = bytearray(ORIGINAL)
        data[i] ^= int(rng.integers(1, 256))
        _raises(bytes(data), CardIntegrityError, "checksum mismatch")


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 9, 100, "json_end", "data", -1])
def test_truncation_in_every_region(cut):
    lo, hi = F.region(ORIGINAL)
    n = {"json_end": hi - 1, "data": (hi + len(ORIGINAL)) // 2, -1: len(ORIGINAL) - 1}
    data = ORIGINAL[: n.get(cut, cut)]
    err = _raises(data, CardFormatError)
    assert not isinstance(err, CardIntegrityError)


@pytest.mark.parametrize("lie", [2**63, 2**64 - 1, 0, 1, "plus", "minus"])
def test_header_length_lies(lie):
    lo, hi = F.region(ORIGINAL)
    n = {"plus": hi - lo + 8, "minus": hi - lo - 8}.get(lie, lie)
    _raises(struct.pack("<Q", n) + ORIGINAL[8:], CardFormatError)


def test_huge_claimed_shape_is_refused_before_allocating():
    header, blob = F.split(ORIGINAL)
    n = 2**40 * 4
    header["tokens"] = {"dtype": "I32", "shape": [2**20, 2**20], "data_offsets": [0, n]}
    data = F.join(F.header_bytes(header), blob)
    tracemalloc.start()
    t0 = time.perf_counter()
    _raises(data, CardTooLargeError, "cap")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 0.5
    assert peak < 4 * len(data) + (1 << 20)


def test_max_bytes_cap_is_configurable(tmp_path):
    _raises(ORIGINAL, CardTooLargeError, "cap", max_bytes=len(ORIGINAL) - 1)
    path = tmp_path / "c.card"
    path.write_bytes(ORIGINAL)
    with pytest.raises(CardTooLargeError):
        CacheCard.load(path, max_bytes=1000)
    assert CacheCard.load(path, max_bytes=len(ORIGINAL)).to_bytes() == ORIGINAL


@pytest.mark.parametrize(
    "offsets", [[-8, 24], [10**9, 10**9 + 192], [192, 0], [0, 2**62]]
)
def test_offsets_outside_the_file(offsets):
    header, blob = F.split(ORIGINAL)
    header["tokens"]["data_offsets"] = offsets
    _raises(F.join(F.header_bytes(header), blob), CardFormatError, "tokens")


def test_overlapping_offsets():
    header, blob = F.split(ORIGINAL)
    # two tensors of the same size: layer 1's float copies alias layer 0's
    header["l1.float"]["data_offsets"] = list(header["l0.float"]["data_offsets"])
    _raises(F.join(F.header_bytes(header), blob), CardFormatError, "overlap")


@pytest.mark.parametrize("dtype", ["F64", "BF16", "I8", "U8", "bogus", None, ["F32"]])
def test_wrong_dtypes(dtype):
    header, blob = F.split(ORIGINAL)
    header["tokens"]["dtype"] = dtype
    _raises(F.join(F.header_bytes(header), blob), CardFormatError, "tokens", "dtype")


def test_missing_and_extra_tensors():
    header, blob = F.split(ORIGINAL)
    del header["l1.index"]
    _raises(F.join(F.header_bytes(header), blob), CardFormatError, "missing")


@pytest.mark.parametrize("where", ["tensor", "field", "metadata", "card"])
def test_duplicate_json_keys_are_rejected(where):
    rng = np.random.default_rng(0)
    for _ in range(50):  # draw until the requested variant comes up
        state = rng.bit_generator.state
        if F.pick(rng, ["tensor", "field", "metadata", "card"]) == where:
            rng.bit_generator.state = state
            break
    data = F.duplicate_keys(ORIGINAL, rng)
    _raises(data, CardFormatError, "duplicate JSON key")


def test_duplicate_key_in_card_json_with_valid_checksum():
    # json.loads would silently keep the second "user"; another reader the first
    _, m, tensors = F.parts(ORIGINAL)
    text = container.canonical_json(m).decode()[:-1] + ',"user":{"role":"admin"}}'
    _raises(F.forge(None, tensors, card_text=text), CardFormatError, "'user'")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "name, at", [("l0.scales", 3), ("l1.biases", -1), ("l0.float", 3)]
)
def test_non_finite_values_with_valid_checksum(name, at, value):
    _, m, t = F.parts(ORIGINAL)
    t[name].reshape(-1)[at] = value  # first segment's keys / last one's values
    _raises(F.forge(m, t), CardFormatError, "NaN or Inf", name)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":NaN}',
        '{"a":1e400}',
        '{"a":"\\ud800"}',
        "[" * 50_000 + "]" * 50_000,
        "[" + ",".join(["{}"] * 50_000) + "]",
        '{"a":' + "9" * 5000 + "}",
        "not json at all",
        "[]",
    ],
)
def test_garbage_card_json_with_valid_checksum(text):
    _, _, t = F.parts(ORIGINAL)
    data = F.forge(None, t, card_text=text)
    tracemalloc.start()
    err = _raises(data, CardFormatError)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # container soup is refused while still inside the header's string
    assert str(err).startswith(("card metadata", "safetensors header: "))
    assert peak <= F.memory_cap(len(data))


def test_deeply_nested_user_metadata():
    _, m, t = F.parts(ORIGINAL)
    deep = 0
    for _ in range(container.MAX_JSON_DEPTH + 5):
        deep = [deep]
    m["user"]["deep"] = deep
    _raises(F.forge(m, t), CardFormatError, "nests deeper")


@pytest.mark.parametrize("where", ["header", "card"])
def test_version_from_the_future(where):
    _, m, t = F.parts(ORIGINAL)
    future = schema.FORMAT_VERSION + 1
    if where == "card":
        m["version"] = future
    data = F.forge(m, t, version=str(future) if where == "header" else "1")
    _raises(data, CardFormatError, "version" if where == "header" else "format/version")


@pytest.mark.parametrize("token", [1000, 2**31 - 1, -1])
def test_token_ids_outside_the_vocabulary(token):
    _, m, t = F.parts(ORIGINAL)
    t["tokens"][5] = token
    _raises(F.forge(m, t), CardFormatError, "token")


@pytest.mark.parametrize(
    "key", ["model_type", "n_layers", "vocab_size", "tokenizer_sha256"]
)
def test_card_for_another_model(key):
    _, m, t = F.parts(ORIGINAL)
    m["model"][key] = {"model_type": "qwen2", "tokenizer_sha256": "cd" * 32}.get(
        key, 999
    )
    data = F.forge(m, t)
    _raises(data, ModelMismatchError, key)
    assert CacheCard.from_bytes(data).model[key] == m["model"][key]  # no expect


@pytest.mark.parametrize(
    "path, value",
    [
        (("version",), True),
        (("version",), 1.0),
        (("cache", "n_tokens"), "48"),
        (("cache", "batch"), -1),
        (("cache", "head_dim_k"), 64.0),
        (("cache", "offset"), False),
        (("cache", "dtype"), "float64"),
        (("layers", 0, 1, "bits"), "4"),
        (("layers", 0, 0, "k", "group"), 3),
        (("quant", "config", "group_size"), 32.0),
        (("quant", "config", "widths"), [4, True]),
        (("quant", "budget_bits"), "4.5"),
        (("model", "vocab_size"), -5),
        (("model", "tokenizer_sha256"), 12),
        (("user",), []),
    ],
)
def test_bad_types_in_metadata_fields(path, value):
    _, m, t = F.parts(ORIGINAL)
    obj = m
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value
    err = _raises(F.forge(m, t), CardFormatError)
    assert str(path[-1]) in str(err) or "version" in str(err)


@pytest.mark.parametrize("kind", ["duplicate", "wrapped_negative", "past_end"])
def test_segment_index_not_a_permutation(kind):
    _, m, t = F.parts(ORIGINAL)
    idx = t["l1.index"]
    assert idx.dtype == np.uint16  # 48 tokens: positions stored as U16
    at = 45  # inside the last segment (2-bit tokens)
    idx[at] = {"duplicate": idx[1], "wrapped_negative": 2**16 - 1, "past_end": 48}[kind]
    err = _raises(F.forge(m, t), CardFormatError)
    assert "layer 1" in str(err) or "l1.index" in str(err)


@pytest.mark.parametrize("bad", [b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80"])
def test_non_utf8_header(bad):
    data = bytearray(ORIGINAL)
    data[40 : 40 + len(bad)] = bad
    _raises(bytes(data), CardFormatError, "UTF-8")


def test_empty_and_odd_files(tmp_path):
    for blob in (b"", b"\0" * 8, struct.pack("<Q", 2) + b"{}"):
        _raises(blob, CardFormatError)
    empty = tmp_path / "empty.card"
    empty.write_bytes(b"")
    with pytest.raises(CardFormatError, match="0 bytes"):
        CacheCard.load(empty)
    with pytest.raises(CardFormatError, match="not a regular file"):
        CacheCard.load(tmp_path)
    with pytest.raises(CardFormatError, match="cannot read"):
        CacheCard.load(tmp_path / "missing.card")


def test_whitespace_in_header_is_accepted_identical():
    lo, hi = F.region(ORIGINAL)
    text = ORIGINAL[lo:hi].rstrip(b" ")
    for pad in (b"\t\n\r ", b"        "):
        spaced = text.replace(b'{"', b'{ "', 1) + pad
        card = _load(F.join(spaced, ORIGINAL[hi:]))
        assert card.to_bytes() == ORIGINAL


def test_header_json_is_what_the_writer_produces():
    # the fuzz helpers must start from a layout the writer really emits
    header, _ = F.split(ORIGINAL)
    assert F.header_bytes(header) == ORIGINAL[8 : F.region(ORIGINAL)[1]]
    assert json.loads(header["__metadata__"]["card"])["version"] == 1  # no rotation


def test_every_error_is_a_card_error():
    # the campaign in miniature: a fixed seed, all categories, no other exception
    rng = np.random.default_rng(7)
    for category in sorted(F.MUTATIONS):
        for _ in range(5):
            _, data = F.mutate(ORIGINAL, rng, category)
            try:
                _load(data)
            except CardError:
                pass


@pytest.mark.parametrize("rotation, version", [("hadamard", "1"), ("none", "2")])
def test_version_must_match_the_rotation(rotation, version):
    # a rotated card claiming version 1 would be misread by a version-1 reader
    _, m, t = F.parts(ORIGINAL)
    m["version"] = int(version)
    if rotation != "none":
        m["quant"]["config"]["rotation"] = rotation
    else:
        m["quant"]["config"].pop("rotation", None)
    _raises(F.forge(m, t, version=version), CardFormatError, "rotation")


SIGNED = F.small_card_bytes(0, key=F.KEY)


@pytest.mark.parametrize("category", sorted(F.AUTH_MUTATIONS))
@pytest.mark.parametrize("seed", range(6))
def test_forged_signatures_are_refused_by_a_keyed_reader(category, seed):
    _, data = F.mutate(SIGNED, np.random.default_rng(seed), category)
    out = F.load_outcome(SIGNED, data, expect=F.FINGERPRINT, key=F.KEY)
    assert out.kind == "error", (category, out)
    assert out.error in ("CardAuthError", "CardIntegrityError", "CardFormatError")


def test_signed_original_is_identical_with_the_key():
    out = F.load_outcome(SIGNED, SIGNED, expect=F.FINGERPRINT, key=F.KEY)
    assert out.kind == "identical"
