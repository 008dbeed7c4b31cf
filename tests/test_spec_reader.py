"""A CacheCard reader written only from docs/cachecard-format.md.

It uses safetensors + numpy + json + hashlib, never qkvshare_mlx.quant.numpy_backend or
qkvshare_mlx.card, so it checks that the spec alone is enough to decode a card
and verify its checksum, and that the library writes what the spec says.
"""

import hashlib
import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load as st_load

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.formats import Format, QuantConfig, QuantizedKV
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
from qkvshare_mlx.quant.numpy_backend import encode_bucket
from qkvshare_mlx.rope import KeyRope, RopeSpec, rope_mx

# ---------------------------------------------------------------------------
# The spec reader.


def spec_header(data: bytes) -> tuple[dict, dict]:
    """Section 1: the safetensors header and its ``__metadata__``."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    return header.pop("__metadata__"), header


def spec_checksum(
    card_text: str, tensors: dict[str, np.ndarray], header, header_version="1"
) -> str:
    """Section 6, byte for byte."""
    u64 = lambda x: struct.pack("<Q", x)  # noqa: E731
    h = hashlib.sha256(f"qkvshare.cachecard/{header_version}\n".encode())
    c = card_text.encode("utf-8")
    h.update(u64(len(c)) + c)
    for name in sorted(tensors):
        info = header[name]
        dims = ", ".join(str(d) for d in info["shape"])
        desc = f"{name}|{info['dtype']}|[{dims}]".encode("ascii")
        raw = np.ascontiguousarray(tensors[name]).tobytes()
        h.update(u64(len(desc)) + desc + u64(len(raw)) + raw)
    return h.hexdigest()


def spec_unpack(words: np.ndarray, bits: int, m: int) -> np.ndarray:
    """Section 4: code i lives in stream bits [i*b, (i+1)*b), LSB first."""
    w = words.astype(np.uint64)
    out = np.empty((*words.shape[:-1], m), dtype=np.int64)
    for i in range(m):
        k = i * bits
        wi, s = k // 32, k % 32
        q = w[..., wi] >> np.uint64(s)
        if s + bits > 32:
            q = q | (w[..., wi + 1] << np.uint64(32 - s))
        out[..., i] = (q & np.uint64((1 << bits) - 1)).astype(np.int64)
    return out


class Slicer:
    """Section 3: a layer's packed 1-D tensors, handed out slice by slice."""

    def __init__(self, tensors, layer: int):
        self.arrays = {
            part: tensors[f"l{layer}.{part}"]
            for part in ("codes", "scales", "biases", "float")
        }
        self.used = dict.fromkeys(self.arrays, 0)

    def take(self, part: str, shape) -> np.ndarray:
        size = int(np.prod(shape))
        start = self.used[part]
        self.used[part] = start + size
        flat = self.arrays[part][start : start + size]
        assert flat.size == size
        return flat.reshape(shape)

    def all_used(self) -> bool:
        return all(self.used[p] == a.size for p, a in self.arrays.items())


def spec_decode(sl: Slicer, enc: dict, bits: int, shape) -> np.ndarray:
    """Sections 3 and 5: the next K or V of a segment as (B, H, n, D) float32."""
    B, H, n, D = shape
    if enc["layout"] == "float":
        return sl.take("float", shape).astype(np.float32)
    g = enc["group"]
    axis, other = (D, n) if enc["layout"] == "token" else (n, D)
    if enc["layout"] == "token" and all(D % x for x in (32, 64, 128)):
        axis = -(-D // g) * g  # section 3.1: padded rows (version 3)
    codes = sl.take("codes", (B, H, other, axis * bits // 32))
    scales = sl.take("scales", (B, H, other, axis // g)).astype(np.float32)
    biases = sl.take("biases", (B, H, other, axis // g)).astype(np.float32)
    m = codes.shape[-1] * 32 // bits
    q = spec_unpack(codes, bits, m).astype(np.float32)
    group = np.arange(m) // enc["group"]
    x = scales[..., group] * q + biases[..., group]
    if enc["layout"] == "channel":
        x = np.swapaxes(x, -1, -2)
    x = x[..., :D]  # section 5: the pad columns are dropped
    assert x.shape[-1] == D
    return x


def spec_rotation(dim: int) -> np.ndarray:
    """Section 5.1: the randomized Hadamard matrix R (D, D)."""
    stream = b""
    counter = 0
    while len(stream) * 8 < dim:
        stream += hashlib.sha256(
            f"qkvshare-mlx/hadamard/{dim}/{counter}".encode()
        ).digest()
        counter += 1
    bit = lambda i: (stream[i // 8] >> (7 - i % 8)) & 1  # noqa: E731
    signs = np.array([-1.0 if bit(i) else 1.0 for i in range(dim)])
    h = np.array([[1.0]])
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return signs[:, None] * h / np.sqrt(dim)


def spec_rope(k: np.ndarray, spec: dict) -> np.ndarray:
    """Section 5.2 on (B, H, T, D) float32 keys: row t's pair i rotated by t * f_i."""
    f = np.array(spec["freqs"], np.float32)
    F = f.shape[0]
    if spec["pairing"] == "half":
        a, b = np.arange(F), np.arange(F) + F
    else:
        assert spec["pairing"] == "interleaved"
        a, b = np.arange(0, 2 * F, 2), np.arange(1, 2 * F, 2)
    t = np.arange(k.shape[2], dtype=np.float64)[:, None]
    angle = t * f.astype(np.float64)
    c, s = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    out = k.copy()
    xa, xb = k[..., a], k[..., b]
    out[..., a] = (xa * c).astype(np.float32) - (xb * s).astype(np.float32)
    out[..., b] = (xa * s).astype(np.float32) + (xb * c).astype(np.float32)
    return out


def spec_read(data: bytes):
    """Decode a card into (meta, tokens, [K per layer], [V per layer])."""
    meta, header = spec_header(data)
    assert meta["format"] == "qkvshare.cachecard"
    assert meta["version"] in ("1", "2", "3", "4")
    card = json.loads(meta["card"])
    assert card["version"] == int(meta["version"])
    tensors = st_load(data)
    checksum = spec_checksum(meta["card"], tensors, header, meta["version"])
    assert checksum == meta["sha256"]
    rotation = card["quant"]["config"].get("rotation", "none")
    c = card["cache"]
    key_rope = card["quant"]["config"].get("key_rope")
    assert (key_rope is not None) == (meta["version"] == "4")  # section 9
    if meta["version"] in ("3", "4"):  # section 9: cache.held_from from version 3
        held = c["held_from"]  # all zero only with padded rows (checked below)
    else:
        assert "held_from" not in c
        assert (rotation != "none") == (meta["version"] == "2")
        held = [0] * c["n_layers"]
    T, B, H = c["n_tokens"], c["batch"], c["n_kv_heads"]
    float_dtype = {"float16": np.float16, "float32": np.float32}[
        card["quant"]["config"]["float_dtype"]
    ]
    keys, values = [], []
    for li, layer in enumerate(card["layers"]):
        idx = tensors[f"l{li}.index"]
        assert idx.dtype == (np.uint16 if T <= 65536 else np.int32)
        assert tensors[f"l{li}.float"].dtype == float_dtype
        sl = Slicer(tensors, li)
        parts_k, parts_v = [], []
        for seg in layer:  # keys then values, segment after segment
            n, bits = seg["n"], seg["bits"]
            parts_k.append(spec_decode(sl, seg["k"], bits, (B, H, n, c["head_dim_k"])))
            vbits = seg.get("vbits", bits)  # section 3: split widths (version 3)
            parts_v.append(spec_decode(sl, seg["v"], vbits, (B, H, n, c["head_dim_v"])))
        assert sl.all_used()
        idx = idx.astype(np.int64)
        assert np.array_equal(np.sort(idx), np.arange(held[li], T))
        # rows before held_from are zeros (section 5: the window masks them)
        k = np.zeros((c["batch"], c["n_kv_heads"], T, c["head_dim_k"]), np.float32)
        v = np.zeros((c["batch"], c["n_kv_heads"], T, c["head_dim_v"]), np.float32)
        k[:, :, idx] = np.concatenate(parts_k, axis=2)
        v[:, :, idx] = np.concatenate(parts_v, axis=2)
        if rotation == "hadamard":  # stored rows are x @ R
            k = (k @ spec_rotation(k.shape[-1]).T).astype(np.float32)
            v = (v @ spec_rotation(v.shape[-1]).T).astype(np.float32)
        if key_rope is not None:  # section 5.2: then RoPE, by row position
            k = spec_rope(k, key_rope["specs"][key_rope["layers"][li]])
        keys.append(k)
        values.append(v)
    return card, tensors["tokens"], keys, values


# ---------------------------------------------------------------------------
# Cards to read.


def _random_cache(L=3, B=1, H=2, T=150, D=64, seed=0):
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for _ in range(L):
        k = rng.standard_normal((B, H, T, D)).astype(np.float32)
        k[..., 3] *= 12.0  # an outlier channel, as real keys have
        ks.append(mx.array(k))
        vs.append(mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)))
    stats = TokenStats(attention=rng.random((L, T)) ** 4, key_norms=rng.random((L, T)))
    return ks, vs, stats


KEY_ROPE = KeyRope(
    (
        RopeSpec("half", tuple(float(np.float32(1e4 ** (-i / 32))) for i in range(32))),
        RopeSpec("interleaved", tuple(float(np.float32(0.9**i)) for i in range(12))),
    ),
    (0, 1, 0),
)

CASES = [
    ("uniform", 4.5, QuantConfig(key_layout="channel")),
    ("uniform", 3.0, QuantConfig(key_layout="token", group_size=32)),
    ("saliency", 4.5, QuantConfig(key_layout="channel", float_dtype="float32")),
    ("saliency-both", 3.0, QuantConfig(key_layout="token")),
    ("sink-recent", 6.0, QuantConfig(float_dtype="float32")),
    ("topology", 5.0, QuantConfig(float_dtype="float16")),
    # Menus that force float tokens next to straddling code widths.
    ("saliency", 8.0, QuantConfig(widths=(3, 5, 16), float_dtype="float32")),
    ("sink-recent", 9.0, QuantConfig(widths=(3, 6, 16), key_layout="token")),
    # Version 3: keys given more bits than values.
    ("saliency", 4.5, QuantConfig(split_kv=True, rotation="hadamard")),
    ("saliency", 3.0, QuantConfig(split_kv=True, key_layout="token")),
    # Version 2: rotated before quantizing.
    ("saliency", 3.5, QuantConfig(rotation="hadamard")),
    ("uniform", 4.5, QuantConfig(rotation="hadamard", key_layout="token")),
    # Version 4: keys stored before RoPE (two specs: one interleaved, partial).
    ("uniform", 3.0, QuantConfig(key_rope=KEY_ROPE)),
    (
        "saliency",
        4.5,
        QuantConfig(key_rope=KEY_ROPE, rotation="hadamard", split_kv=True),
    ),
]


@pytest.mark.parametrize("controller,budget,config", CASES)
def test_spec_reader_matches_mlx_path(controller, budget, config):
    ks, vs, stats = _random_cache()
    if config.key_rope is not None:  # cached keys are RoPE'd: outliers spread
        ks = [rope_mx(k, config.key_rope.spec(li)) for li, k in enumerate(ks)]
    qkv = quantize_cache(
        ks, vs, controller=controller, budget_bits=budget, config=config, stats=stats
    )
    T = qkv.n_tokens
    tokens = np.arange(T) * 7 % 1000
    card = CacheCard.from_quantized(qkv, tokens, {"model_type": "llama"})
    data = card.to_bytes()

    meta, got_tokens, k_spec, v_spec = spec_read(data)
    assert np.array_equal(got_tokens, tokens)
    assert meta["cache"]["n_tokens"] == T
    k_mlx, v_mlx = dequantize_cache(qkv, mx.float32)
    for li in range(len(ks)):
        for got, want in ((k_spec[li], k_mlx[li]), (v_spec[li], v_mlx[li])):
            want = np.array(want)
            # un-rotated in float64 here, float32 there: float32 rounding apart
            exact = config.rotation == "none" and config.key_rope is None
            tol = 1e-6 if exact else 1e-6 * np.abs(want).max()
            assert np.abs(got - want).max() <= tol
        # And the result is a real reconstruction, not two equal wrong answers.
        assert np.abs(k_spec[li] - np.array(ks[li])).mean() < 0.5

    # Payload accounting of section 7 agrees with the card's own figure.
    tensors = st_load(data)
    payload = sum(
        a.nbytes
        for n, a in tensors.items()
        if n != "tokens" and not n.endswith(".index")
    )
    c = meta["cache"]
    held = sum(T - h for h in c.get("held_from", [0] * c["n_layers"]))
    n_el = c["batch"] * c["n_kv_heads"] * held * (c["head_dim_k"] + c["head_dim_v"])
    assert payload == card.payload_bytes
    assert 8 * payload / n_el == pytest.approx(
        meta["quant"]["effective_bits"], abs=1e-5
    )


@pytest.mark.parametrize("controller", ["uniform", "saliency"])
@pytest.mark.parametrize("key_layout", ["channel", "token"])
def test_spec_reader_matches_a_head_dim_80_card(controller, key_layout):
    """Version 3: rows of 80 are stored padded to 96 in groups of 32."""
    ks, vs, stats = _random_cache(D=80, T=100)
    qkv = quantize_cache(
        ks,
        vs,
        controller=controller,
        budget_bits=4.5,
        config=QuantConfig(key_layout=key_layout),
        stats=stats,
    )
    data = CacheCard.from_quantized(qkv, np.arange(100), {}).to_bytes()
    meta, _, k_spec, v_spec = spec_read(data)
    assert meta["version"] == 3 and meta["cache"]["held_from"] == [0, 0, 0]
    assert {s["v"]["group"] for layer in meta["layers"] for s in layer} <= {0, 32}
    k_mlx, v_mlx = dequantize_cache(qkv, mx.float32)
    for li in range(3):
        for got, want, orig in (
            (k_spec[li], k_mlx[li], ks[li]),
            (v_spec[li], v_mlx[li], vs[li]),
        ):
            assert got.shape == (1, 2, 100, 80)
            assert np.abs(got - np.array(want)).max() <= 1e-6
            assert np.abs(got - np.array(orig)).mean() < 0.5


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_spec_reader_matches_a_windowed_card(rotation):
    """Version 3: the sliding layers (window 64) hold positions 86..149 only."""
    ks, vs, stats = _random_cache()
    qkv = quantize_cache(
        ks,
        vs,
        controller="saliency",
        budget_bits=4.5,
        config=QuantConfig(rotation=rotation),
        stats=stats,
        windows=[64, None, 64],
    )
    fp = {
        "model_type": "gemma3_text",
        "n_layers": 3,
        "sliding_window": 64,
        "layer_types": ["sliding", "full", "sliding"],
    }
    data = CacheCard.from_quantized(qkv, np.arange(150), fp).to_bytes()
    meta, _, k_spec, v_spec = spec_read(data)
    assert meta["version"] == 3 and meta["cache"]["held_from"] == [86, 0, 86]
    k_mlx, v_mlx = dequantize_cache(qkv, mx.float32)
    for li in range(3):
        for got, want in ((k_spec[li], k_mlx[li]), (v_spec[li], v_mlx[li])):
            want = np.array(want)
            assert np.abs(got - want).max() <= 1e-6 * max(np.abs(want).max(), 1)
    assert not k_spec[0][:, :, :86].any() and k_spec[1][:, :, :86].any()


def test_spec_cases_cover_every_layout_and_mixed_widths():
    """The cases above really exercise channel keys, float tokens, straddling codes."""
    layouts, widths, float_dtypes = set(), set(), set()
    ks, vs, stats = _random_cache()
    float_names = {"float16": "F16", "float32": "F32"}
    for controller, budget, config in CASES:
        qkv = quantize_cache(
            ks,
            vs,
            controller=controller,
            budget_bits=budget,
            config=config,
            stats=stats,
        )
        card = CacheCard.from_quantized(qkv, np.zeros(qkv.n_tokens), {})
        meta, header = spec_header(card.to_bytes())
        meta = json.loads(meta["card"])
        for li, layer in enumerate(meta["layers"]):
            for seg in layer:
                layouts.add(seg["k"]["layout"])
                widths.add(seg["bits"])
                if seg["k"]["layout"] == "float":
                    float_dtypes.add(header[f"l{li}.float"]["dtype"])
                    assert (
                        header[f"l{li}.float"]["dtype"]
                        == float_names[meta["quant"]["config"]["float_dtype"]]
                    )
    assert {"token", "channel", "float"} <= layouts
    assert {3, 5, 6} & widths  # widths whose codes straddle words
    assert len(widths) >= 4
    assert float_dtypes == {"F16", "F32"}


def test_spec_worked_example():
    """The 3-bit example of section 4, unpacked by the spec reader."""
    words = np.array([0x008B11DD, 0, 0], dtype=np.uint32)
    assert spec_unpack(words, 3, 32)[:8].tolist() == [5, 3, 7, 0, 1, 6, 2, 4]
    words = np.array([0xC0000000, 0x80000001, 0x00000002], dtype=np.uint32)
    q = spec_unpack(words, 3, 32)
    assert q[10] == 7 and q[21] == 5 and q.sum() == 12
    words = np.array([0x88FAC688, 0xC688FAC6, 0xFAC688FA], dtype=np.uint32)
    assert spec_unpack(words, 3, 32).tolist() == [i % 8 for i in range(32)]


def test_spec_checksum_detects_tampering():
    ks, vs, stats = _random_cache(L=1, T=40)
    qkv = quantize_cache(ks, vs, controller="uniform", budget_bits=4.5)
    data = bytearray(CacheCard.from_quantized(qkv, np.arange(40), {}).to_bytes())
    meta, header = spec_header(bytes(data))
    base = 8 + struct.unpack("<Q", data[:8])[0]
    _, end = header["l0.codes"]["data_offsets"]
    data[base + end - 1] ^= 0x01  # the last value code of layer 0
    tensors = st_load(bytes(data))
    assert spec_checksum(meta["card"], tensors, header) != meta["sha256"]


def test_spec_packing_worked_example():
    """The two-segment example of section 3.2: slice offsets and lengths."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((1, 2, 100, 64)).astype(np.float32)
    values = rng.standard_normal((1, 2, 100, 64)).astype(np.float32)
    order = rng.permutation(100).astype(np.int32)
    segs = encode_bucket(keys, values, order[:64], Format(4, "channel", 64, 32))
    segs += encode_bucket(keys, values, order[64:], Format(16, "token", 0, 0))
    qkv = QuantizedKV([segs], 100, (1, 2, 64, 64), QuantConfig(), "uniform", 6.0)
    data = CacheCard.from_quantized(qkv, np.zeros(100), {}).to_bytes()
    _, header = spec_header(data)
    lengths = {n: (h["dtype"], h["shape"]) for n, h in header.items()}
    assert lengths == {
        "tokens": ("I32", [100]),
        "l0.index": ("U16", [100]),
        "l0.codes": ("U32", [2048]),
        "l0.scales": ("F16", [384]),
        "l0.biases": ("F16", [384]),
        "l0.float": ("F16", [9216]),
    }
    t = st_load(data)
    s0, s1 = segs
    for name, lo, hi, shape, want in [
        ("l0.codes", 0, 1024, (1, 2, 64, 8), s0.keys.codes),
        ("l0.codes", 1024, 2048, (1, 2, 64, 8), s0.values.codes),
        ("l0.scales", 0, 128, (1, 2, 64, 1), s0.keys.scales),
        ("l0.scales", 128, 384, (1, 2, 64, 2), s0.values.scales),
        ("l0.biases", 128, 384, (1, 2, 64, 2), s0.values.biases),
        ("l0.float", 0, 4608, (1, 2, 36, 64), s1.keys.data),
        ("l0.float", 4608, 9216, (1, 2, 36, 64), s1.values.data),
        ("l0.index", 64, 100, (36,), order[64:]),
    ]:
        assert np.array_equal(t[name][lo:hi].reshape(shape), want), (name, lo)
