"""CacheCard container: bit-exact round trips, atomic saves, model checks,
tamper detection and honest size accounting."""

import json
import os
import struct

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import (
    CardFormatError,
    CardIntegrityError,
    ModelMismatchError,
)
from qkvshare_mlx.fingerprint import fingerprint_from_config
from qkvshare_mlx.formats import Format, QuantConfig, QuantizedKV
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import quantize_cache
from qkvshare_mlx.quant.numpy_backend import encode_bucket
from qkvshare_mlx.testing import mutations as F

CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "hidden_size": 384,
    "rope_theta": 10000.0,
    "vocab_size": 1000,
}


def make_card(L=4, H=2, T=100, D=64, controller="saliency", budget=4.5, seed=0, **kw):
    rng = np.random.default_rng(seed)
    ks = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    vs = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    stats = TokenStats(attention=rng.random((L, T)) ** 3)
    config = kw.pop("config", QuantConfig(float_dtype="float32"))
    qkv = quantize_cache(
        ks, vs, controller=controller, budget_bits=budget, config=config, stats=stats
    )
    fp = fingerprint_from_config({**CONFIG, "num_hidden_layers": L})
    tokens = rng.integers(0, 1000, T)
    return CacheCard.from_quantized(qkv, tokens, fp, user={"role": "planner"}), qkv


def assert_cards_equal(a: CacheCard, b: CacheCard):
    assert np.array_equal(a.tokens, b.tokens)
    assert (a.model, a.cache, a.quant, a.producer, a.user) == (
        b.model,
        b.cache,
        b.quant,
        b.producer,
        b.user,
    )
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert len(la) == len(lb)
        for sa, sb in zip(la, lb):
            assert sa.bits == sb.bits
            assert np.array_equal(sa.index, sb.index)
            for ea, eb in ((sa.keys, sb.keys), (sa.values, sb.values)):
                assert (ea.layout, ea.group) == (eb.layout, eb.group)
                for name, arr in ea.arrays().items():
                    other = eb.arrays()[name]
                    assert arr.dtype == other.dtype and arr.shape == other.shape
                    assert arr.tobytes() == other.tobytes()


# ---------------------------------------------------------------------------
# Round trips


def test_bytes_round_trip_is_bit_exact():
    card, _ = make_card()
    data = card.to_bytes()
    back = CacheCard.from_bytes(data)
    assert_cards_equal(card, back)
    assert back.to_bytes() == data
    assert back.checksum() == card.checksum()


def test_round_trip_through_to_quantized():
    card, qkv = make_card(controller="topology")
    again = CacheCard.from_quantized(
        card.to_quantized(), card.tokens, card.model, user=card.user
    )
    assert again.to_bytes() == card.to_bytes()
    assert card.to_quantized().effective_bits == pytest.approx(qkv.effective_bits)


def test_save_is_atomic_and_replaces_target(tmp_path):
    card, _ = make_card(L=2, T=40)
    target = tmp_path / "a.card"
    target.write_bytes(b"old contents")
    card.save(target)
    assert os.listdir(tmp_path) == ["a.card"]
    assert target.read_bytes() == card.to_bytes()
    assert_cards_equal(CacheCard.load(target), card)


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    card, _ = make_card(L=2, T=40)
    target = tmp_path / "a.card"
    target.write_bytes(b"old contents")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        card.save(target)
    assert os.listdir(tmp_path) == ["a.card"]
    assert target.read_bytes() == b"old contents"


# ---------------------------------------------------------------------------
# Model checks


def test_load_with_matching_model_succeeds(tmp_path):
    card, _ = make_card()
    path = card.save(tmp_path / "c.card")
    fp = fingerprint_from_config(CONFIG)
    assert CacheCard.load(path, expect=fp).n_tokens == card.n_tokens


def test_load_refuses_another_model_listing_every_field(tmp_path):
    card, _ = make_card()
    path = card.save(tmp_path / "c.card")
    other = fingerprint_from_config(
        {
            **CONFIG,
            "model_type": "qwen2",
            "num_hidden_layers": 30,
            "num_key_value_heads": 3,
            "rope_theta": 500000.0,
        }
    )
    with pytest.raises(ModelMismatchError) as err:
        CacheCard.load(path, expect=other)
    message = str(err.value)
    for field in ("model_type", "n_layers", "n_kv_heads", "rope_theta"):
        assert field in message
    assert "500000.0" in message and "'qwen2'" in message
    for same in ("head_dim", "vocab_size"):
        assert same not in message


def test_tokenizer_hash_mismatch_is_refused():
    card, _ = make_card()
    card.model["tokenizer_sha256"] = "a" * 64
    fp = {**fingerprint_from_config(CONFIG), "tokenizer_sha256": "b" * 64}
    with pytest.raises(ModelMismatchError, match="tokenizer_sha256"):
        CacheCard.from_bytes(card.to_bytes(), expect=fp)
    # Unknown on one side: not a reason to refuse.
    fp["tokenizer_sha256"] = None
    CacheCard.from_bytes(card.to_bytes(), expect=fp)


# ---------------------------------------------------------------------------
# Tamper detection


def _tensor_region(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n, len(data)


def test_every_sampled_payload_byte_flip_is_caught():
    card, _ = make_card(L=2, T=70)
    data = card.to_bytes()
    start, end = _tensor_region(data)
    rng = np.random.default_rng(1)
    positions = np.unique(rng.integers(start, end, 200))
    for pos in positions:
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= mask
            with pytest.raises((CardIntegrityError, CardFormatError)):
                CacheCard.from_bytes(bytes(bad))


def test_every_sampled_header_byte_flip_is_caught():
    card, _ = make_card(L=2, T=70)
    data = card.to_bytes()
    header_end, _ = _tensor_region(data)
    rng = np.random.default_rng(2)
    # The whole header: card JSON, sha256, tensor table, padding, length.
    positions = np.unique(
        np.concatenate([np.arange(8), rng.integers(8, header_end, 300)])
    )
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises((CardIntegrityError, CardFormatError)):
            CacheCard.from_bytes(bytes(bad))


def test_metadata_edit_with_valid_json_is_an_integrity_error():
    card, _ = make_card(L=2, T=70)
    data = card.to_bytes()
    needle = b'\\"role\\":\\"planner\\"'
    assert data.count(needle) == 1
    bad = data.replace(needle, b'\\"role\\":\\"plannex\\"')
    with pytest.raises(CardIntegrityError, match="checksum"):
        CacheCard.from_bytes(bad)


def test_truncated_card_is_refused():
    data = make_card(L=2, T=70)[0].to_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(CardFormatError):
            CacheCard.from_bytes(data[:cut])


# ---------------------------------------------------------------------------
# Accounting


REALISTIC = dict(L=30, H=3, T=512, D=64, budget=4.5)  # SmolLM2-135M's cache shape


def _size_parts(card):
    data = card.to_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    L, T = card.cache["n_layers"], card.n_tokens
    ids = 4 * T + 2 * T * L  # tokens (I32) + per-layer index (U16 up to 65536)
    return len(data), header, ids


def test_card_size_accounts_for_every_byte():
    """file = 8 + header + payload + token ids + indices; the header costs the
    segment table (~150 B/segment) plus five packed tensors per layer."""
    for controller in ("uniform", "saliency"):
        card, qkv = make_card(controller=controller, **REALISTIC)
        size, header, ids = _size_parts(card)
        assert size == 8 + header + card.payload_bytes + ids
        n_segments = sum(len(layer) for layer in card.layers)
        assert header <= 200 * n_segments + 512 * 30 + 4 * 1024
        assert card.payload_bytes == qkv.payload_bytes
        n_el = 30 * 3 * 512 * 128
        assert card.effective_bits * n_el / 8 == card.payload_bytes
        assert abs(card.effective_bits - 4.5) <= 0.05


def _within_two_percent(card):
    """Issue 4: file bytes <= 1.02 x the payload its effective bits imply + 64 KiB."""
    size, _, _ = _size_parts(card)
    implied = card.effective_bits * card.n_elements / 8
    assert implied == card.payload_bytes
    assert size <= 1.02 * implied + 64 * 1024, (size, implied, size / implied)


def test_uniform_card_within_two_percent_of_payload():
    card, _ = make_card(controller="uniform", **REALISTIC)
    _within_two_percent(card)


@pytest.mark.parametrize("T,budget", [(512, 4.5), (512, 3.0), (1024, 4.5)])
def test_mixed_card_within_two_percent_of_payload(T, budget):
    shape = {**REALISTIC, "T": T, "budget": budget}
    card, _ = make_card(controller="saliency", **shape)
    # really mixed: several widths and several segments per layer
    assert len(card.width_histogram()) >= 3
    assert sum(len(layer) for layer in card.layers) >= 4 * 30
    _within_two_percent(card)


def test_packed_layout_has_five_tensors_per_layer():
    """Per layer: index + codes/scales/biases/float, 1-D, however many segments."""
    card, _ = make_card(L=3, T=150, controller="saliency")
    header, _ = _header(card.to_bytes())
    names = sorted(n for n in header if n != "__metadata__")
    parts = ("biases", "codes", "float", "index", "scales")
    assert names == sorted(["tokens"] + [f"l{i}.{p}" for i in range(3) for p in parts])
    assert all(len(header[n]["shape"]) == 1 for n in names)
    assert header["l0.index"]["dtype"] == "U16" and header["l0.index"]["shape"] == [150]
    assert header["l0.float"]["dtype"] == "F32"  # make_card's float_dtype
    # the reader hands out views into the packed tensors, not copies
    back = CacheCard.from_bytes(card.to_bytes())
    enc = next(s.keys for s in back.layers[0] if s.keys.layout != "float")
    assert enc.codes.base is not None and not enc.codes.flags.owndata
    assert back.layers[0][0].index.dtype == np.int32


def _header(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def _uniform_numpy_card(T, H=1, D=32):
    """A 2-bit per-token card built with the numpy codec (no MLX), T tokens."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((1, H, T, D)).astype(np.float32)
    values = rng.standard_normal((1, H, T, D)).astype(np.float32)
    order = np.arange(T, dtype=np.int32)[::-1].copy()
    segs = encode_bucket(keys, values, order, Format(2, "token", 32, 32))
    config = QuantConfig(group_size=32, key_layout="token", widths=(2,))
    qkv = QuantizedKV([segs], T, (1, H, D, D), config, "uniform", budget_bits=3.0)
    return CacheCard.from_quantized(qkv, np.zeros(T), {"model_type": "llama"})


@pytest.mark.parametrize("T,dtype", [(65536, "U16"), (65537, "I32")])
def test_index_dtype_switches_to_int32_past_65536_tokens(T, dtype):
    card = _uniform_numpy_card(T)
    data = card.to_bytes()
    header, base = _header(data)
    assert header["l0.index"]["dtype"] == dtype
    back = CacheCard.from_bytes(data)
    assert back.to_bytes() == data
    assert np.array_equal(back.layers[0][0].index, np.arange(T)[::-1])
    # A repeated position; in I32 also a negative one or one past the end
    # (a U16 index of 65536 tokens has no out-of-range value).
    bad = {T - 1: "not a permutation"}
    if dtype == "I32":
        bad.update(dict.fromkeys([-1, T], "l0.index: positions outside"))
    for value, message in bad.items():
        _, m, t = F.parts(data)
        t["l0.index"][7] = value
        with pytest.raises(CardFormatError, match=message):
            CacheCard.from_bytes(F.forge(m, t))


def test_writer_refuses_what_the_reader_would_refuse():
    card, _ = make_card(L=2, T=40, controller="uniform")
    seg = card.layers[0][0]
    codes = seg.keys.codes
    seg.keys.codes = codes[..., :-1]  # wrong shape for the descriptor
    with pytest.raises(CardFormatError, match=r"layers\[0\]\[0\]\.k: codes expected"):
        card.to_bytes()
    seg.keys.codes = codes
    index = seg.index.copy()
    seg.index = index * 0  # positions repeated: not a permutation
    with pytest.raises(CardFormatError, match="permutation"):
        card.to_bytes()
    seg.index = index
    card.quant["config"]["float_dtype"] = "float16"  # make_card stored float32
    if any(s.bits == 16 for layer in card.layers for s in layer):
        with pytest.raises(CardFormatError, match="float expected F16"):
            card.to_bytes()


def test_effective_bits_and_fp16_compression():
    card, qkv = make_card(
        L=3,
        H=2,
        T=128,
        D=64,
        controller="uniform",
        budget=4.5,
        config=QuantConfig(key_layout="token", adaptive_groups=False),
    )
    n_el = 3 * 2 * 128 * 128
    assert card.n_elements == n_el
    assert card.fp16_bytes == 2 * n_el
    # 4-bit codes, group 64: 4 + 2*16/64 = 4.5 bits per element, exactly.
    assert card.width_histogram() == {4: 3 * 128}
    assert card.payload_bytes == n_el * 4.5 / 8
    assert card.effective_bits == 4.5 == card.quant["effective_bits"]
    assert card.quant["nominal_bits"] == 4.0
    assert card.fp16_bytes / card.payload_bytes == pytest.approx(16 / 4.5)
    assert card.effective_bits == pytest.approx(qkv.effective_bits)


def test_float32_tokens_count_32_bits():
    card, _ = make_card(
        L=1,
        H=1,
        T=64,
        D=64,
        controller="uniform",
        budget=32,
        config=QuantConfig(float_dtype="float32"),
    )
    assert card.width_histogram() == {16: 64}
    assert card.effective_bits == 32.0


# ---------------------------------------------------------------------------
# qkvshare inspect


def test_inspect_reports_verified_figures(tmp_path, capsys):
    import json

    from qkvshare_mlx.cli import main as cli_main
    from qkvshare_mlx.cli.inspect import summarize

    card, _ = make_card(L=2, T=70)
    path = card.save(tmp_path / "c.card")
    assert cli_main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    size = path.stat().st_size
    assert out["bytes"] == {
        "file": size,
        "payload": card.payload_bytes,
        "overhead": size - card.payload_bytes,
        "fp16": card.fp16_bytes,
    }
    assert out["compression_vs_fp16"] == pytest.approx(card.fp16_bytes / size)
    assert out["checksum"] == {"status": "verified", "sha256": card.checksum()}
    assert out["tokens"]["count"] == 70
    assert sum(w["tokens"] for w in out["widths"].values()) == 2 * 70
    assert out == json.loads(json.dumps(summarize(card, file_bytes=size)))
    assert out["format_version"] == 1
    rotated, _ = make_card(L=2, T=70, config=QuantConfig(rotation="hadamard"))
    path = rotated.save(tmp_path / "r.card")
    assert cli_main(["inspect", str(path)]) == 0
    assert "rotation hadamard  (format v2)" in capsys.readouterr().out


def test_inspect_fails_on_a_tampered_card(tmp_path, capsys):
    from qkvshare_mlx.cli import main as cli_main

    path = make_card(L=2, T=70)[0].save(tmp_path / "c.card")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qkvshare: error:") and "checksum" in err
    assert "\n" not in err


# ----------------------------------------------------------------------------
# Schema strictness (docs/cachecard-format.md, section 8.4)


def _reforge(edit, seed=0):
    """A small valid card whose card JSON ``edit`` changed, checksum valid."""
    meta, m, tensors = F.parts(F.small_card_bytes(seed))
    edit(m)
    return F.forge(m, tensors)


@pytest.mark.parametrize(
    "path",
    [(), ("cache",), ("quant",), ("layers", 0, 0), ("layers", 0, 0, "k")],
    ids=["card", "cache", "quant", "segment", "segment.k"],
)
def test_extra_key_refused_where_the_reader_would_drop_it(path):
    def edit(m):
        obj = m
        for p in path:
            obj = obj[p]
        obj["extra"] = 1

    with pytest.raises(CardFormatError, match="extra \\['extra'\\]"):
        CacheCard.from_bytes(_reforge(edit))


@pytest.mark.parametrize("where", ["model", "producer", "user"])
def test_extra_key_kept_where_allowed(where):
    data = _reforge(lambda m: m[where].update(future_field="x"))
    card = CacheCard.from_bytes(data)
    assert getattr(card, where)["future_field"] == "x"
    assert card.to_bytes() == data  # kept as read, so handed on unchanged


@pytest.mark.parametrize("value", [2**31, -1])
def test_cache_ints_are_int32(value):
    with pytest.raises(CardFormatError, match="cache.offset.*0..2147483647"):
        CacheCard.from_bytes(_reforge(lambda m: m["cache"].update(offset=value)))


def test_largest_int32_offset_is_read():
    data = _reforge(lambda m: m["cache"].update(offset=2**31 - 1))
    assert CacheCard.from_bytes(data).offset == 2**31 - 1


@pytest.mark.parametrize(
    "field,value",
    [(("cache", "n_tokens"), True), (("layers", 0, 0, "bits"), True)],
)
def test_json_true_is_no_integer(field, value):
    def edit(m):
        obj = m
        for p in field[:-1]:
            obj = obj[p]
        obj[field[-1]] = value

    with pytest.raises(CardFormatError, match="expected int, got True"):
        CacheCard.from_bytes(_reforge(edit))


@pytest.mark.parametrize("digest", ["ab" * 31, "AB" * 32, "zz" * 32, 5])
def test_hash_fields_are_64_lowercase_hex(digest):
    data = _reforge(lambda m: m["model"].update(weights_sha256=digest))
    with pytest.raises(CardFormatError, match="model.weights_sha256"):
        CacheCard.from_bytes(data)


def test_model_keys_may_be_missing():
    # older writers (and hand-built fingerprints) omit fields: unknown, not wrong
    data = _reforge(lambda m: m["model"].pop("weights_sha256"))
    assert "weights_sha256" not in CacheCard.from_bytes(data).model


# ----------------------------------------------------------------------------
# Sliding-window layers hold their window only (version 3, cache.held_from)

WINDOWED = F.small_card_bytes(0, n_tokens=64, window=46)
WINDOWED_FP = F.fingerprint_for(2, 46)


def _reforge_windowed(edit, tensors_edit=None):
    _, m, t = F.parts(WINDOWED)
    edit(m)
    if tensors_edit is not None:
        tensors_edit(t)
    return F.forge(m, t)


def test_windowed_card_is_version_3_and_round_trips():
    card = CacheCard.from_bytes(WINDOWED, expect=WINDOWED_FP)
    assert card.version == 3 and card.qkv.starts == [18, 0]
    assert card.cache["held_from"] == [18, 0]
    assert card.to_bytes() == WINDOWED
    # accounting counts held rows only: 46 + 64 tokens of 2 heads x 128
    assert card.n_elements == (46 + 64) * 2 * 128
    # the decoded sliding layer has zero rows before its window
    from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np

    keys, _ = dequantize_cache_np(card.to_quantized())
    assert keys[0].shape == keys[1].shape == (1, 2, 64, 64)
    assert not keys[0][:, :, :18].any() and keys[0][:, :, 18:].all()


def test_card_without_trimmed_layers_stays_version_1():
    card = F.small_card(0, n_tokens=64, window=64)  # window holds every token
    assert card.qkv.held_from is None and card.version == 1


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda m: m["cache"].update(held_from=[0, 18]),
            "held_from[1]: 18 not in 0..0",
        ),
        (
            lambda m: m["cache"].update(held_from=[19, 0]),
            "held_from[0]: 19 not in 0..18",
        ),
        (
            lambda m: m["cache"].update(held_from=[0, 0]),
            "layers[0]: segments cover 46 tokens, expected 64",
        ),
        (lambda m: m["cache"].update(held_from=[18]), "expected 2 integers"),
        (lambda m: m["cache"].update(held_from=[18.0, 0]), "expected 2 integers"),
        (
            lambda m: m["model"].update(layer_types=["full", "sliding"]),
            "held_from[0]: 18 not in 0..0 (layer 0: full attention",
        ),
        (lambda m: m["model"].pop("sliding_window"), "full attention"),
    ],
    ids=[
        "full-layer",
        "past-window",
        "all-zero",
        "short",
        "float",
        "types-swapped",
        "no-window",
    ],
)
def test_held_from_must_fit_the_model_windows(edit, words):
    with pytest.raises(CardFormatError) as info:
        CacheCard.from_bytes(_reforge_windowed(edit))
    assert words in str(info.value)


def test_held_from_needs_version_3_and_version_3_needs_it():
    _, m, t = F.parts(WINDOWED)
    for version in (1, 2):
        m["version"] = version
        with pytest.raises(CardFormatError, match="cache: expected keys"):
            CacheCard.from_bytes(F.forge(m, t, version=str(version)))
    _, plain, plain_t = F.parts(F.small_card_bytes(0))
    plain["version"] = 3
    with pytest.raises(CardFormatError, match="cache: expected keys"):
        CacheCard.from_bytes(F.forge(plain, plain_t, version="3"))
    plain["cache"]["held_from"] = [0, 0]
    with pytest.raises(CardFormatError, match="all zero and no padded rows"):
        CacheCard.from_bytes(F.forge(plain, plain_t, version="3"))


def test_trimmed_layer_index_covers_its_window_exactly():
    def shift(t):  # a held position moved before the window
        t["l0.index"][0] = 3

    with pytest.raises(CardFormatError, match="l0.index: positions outside 18..63"):
        CacheCard.from_bytes(_reforge_windowed(lambda m: None, shift))

    def grow(m):  # the layer claims every token: table and tensors disagree
        m["cache"]["held_from"] = [0, 0]

    with pytest.raises(CardFormatError):
        CacheCard.from_bytes(_reforge_windowed(grow))


def test_windowed_card_fuzz_is_rejected_or_identical():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(300):
        category, data = F.mutate(WINDOWED, rng)
        out = F.load_outcome(WINDOWED, data, expect=WINDOWED_FP)
        assert out.kind in ("error", "identical"), (category, out)
        seen.add(category)
    assert len(seen) >= 10


# ----------------------------------------------------------------------------
# Keys wider than values (version 3: segment "vbits", quant.config.split_kv)


def _split_card_bytes():
    from qkvshare_mlx.quant.numpy_backend import quantize_cache_np

    rng = np.random.default_rng(4)
    keys = [rng.standard_normal((1, 2, 80, 64)).astype(np.float32) for _ in range(2)]
    values = [rng.standard_normal((1, 2, 80, 64)).astype(np.float32) for _ in range(2)]
    stats = TokenStats(attention=rng.random((2, 80)) ** 4)
    qkv = quantize_cache_np(
        keys, values, budget_bits=4.5, stats=stats, config=QuantConfig(split_kv=True)
    )
    card = CacheCard.from_quantized(qkv, np.arange(80), F.fingerprint_for(2))
    return card, card.to_bytes()


def test_split_card_round_trips_as_version_3():
    card, data = _split_card_bytes()
    back = CacheCard.from_bytes(data)
    assert back.version == 3 and back.cache["held_from"] == [0, 0]
    assert back.quant["config"]["split_kv"] is True
    pairs = {(s.bits, s.vbits) for layer in back.layers for s in layer}
    assert any(b > vb for b, vb in pairs) and all(b >= vb for b, vb in pairs)
    assert back.to_bytes() == data
    assert card.quant["nominal_bits"] == back.quant["nominal_bits"]


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda m: _first_split(m).update(vbits=_first_split(m)["bits"]),
            "two different",
        ),
        (lambda m: _first_split(m).update(vbits=16), "two different"),
        (lambda m: m["quant"]["config"].update(split_kv=False), "false is written"),
    ],
    ids=["same-widths", "float-values", "false-flag"],
)
def test_split_segments_are_checked(edit, words):
    _, data = _split_card_bytes()
    _, m, t = F.parts(data)
    edit(m)
    with pytest.raises(CardFormatError, match=words):
        CacheCard.from_bytes(F.forge(m, t))


def _first_split(m):
    return next(s for layer in m["layers"] for s in layer if "vbits" in s)


def test_split_widths_need_version_3():
    _, data = _split_card_bytes()
    _, m, t = F.parts(data)
    m["version"] = 1
    del m["cache"]["held_from"]
    del m["quant"]["config"]["split_kv"]
    with pytest.raises(CardFormatError, match="expected keys"):
        CacheCard.from_bytes(F.forge(m, t, version="1"))
