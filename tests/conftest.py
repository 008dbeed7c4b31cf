"""Shared fixtures: one tiny random-weight Llama factory and the real default model.

:func:`tiny_llama` is tier (b) of the test plan: one small Llama, in MLX
(mlx-lm), in transformers, or in both with the SAME float32 weights, so that
anything one runtime produces (logits, KV caches, cards) can be checked against
the other in milliseconds. Its config variants are plain dicts below; the
fixtures are built on it. ``default_model_dir`` is tier (c): the real embedded
model (slow).
"""

from dataclasses import dataclass

import numpy as np
import pytest

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before anything imports mlx

# ----------------------------------------------------------------------------
# Config variants (data): head_dim a multiple of the quantizer's group sizes.

TINY_LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # the smallest head the group sizes (32, 64, 128) fit
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
# head_dim 64: every group size of the format menu fits (cross-runtime, HF cache)
WIDE_HEAD_CONFIG = {**TINY_LLAMA_CONFIG, "head_dim": 64, "max_position_embeddings": 512}
# wider than the twins (hidden_size 128): agent chains and evals
CHAIN_LLAMA_CONFIG = {**TINY_LLAMA_CONFIG, "hidden_size": 128}
# a bigger vocabulary and MLP: a prefill saved by mlx-lm's save_prompt_cache
PROMPT_CACHE_CONFIG = {
    **TINY_LLAMA_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 300,
}
# The model a synthetic card claims to come from (its fingerprint only; no weights).
CARD_MODEL_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "hidden_size": 384,
    "rope_theta": 10000.0,
    "vocab_size": 1000,
}


@dataclass
class TinyTwins:
    """A tiny Llama in one or both runtimes (float32, eval mode).

    ``mlx_model`` / ``hf_model`` is None for a runtime that was not asked for.
    """

    mlx_model: object
    hf_model: object
    config: dict

    @property
    def n_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def n_kv_heads(self) -> int:
        return self.config["num_key_value_heads"]

    @property
    def head_dim(self) -> int:
        return self.config["head_dim"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]


def _random_weights_mlx(model, seed: int) -> None:
    """mx.random draws, in tree_flatten order, over an MLX model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = [
        (
            name,
            1.0 + 0.1 * mx.random.normal(p.shape)
            if "norm" in name
            else 0.2 * mx.random.normal(p.shape),
        )
        for name, p in tree_flatten(model.parameters())
    ]
    model.load_weights(params, strict=True)


def _random_weights_torch(model) -> None:
    """torch draws, in named_parameters order, over an HF model."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))


def tiny_llama(
    config: dict | None = None,
    *,
    seed: int = 0,
    runtimes: tuple[str, ...] = ("mlx",),
    init: str = "mlx",
    attn_implementation: str = "eager",
) -> TinyTwins:
    """The one tiny random-weight Llama builder of the test suite.

    HF's init (std 0.02) makes near-uniform logits that hide mistakes; every
    weight is drawn instead as N(0, 0.2) (norm weights 1 + N(0, 0.1)), large
    enough that attention and RoPE visibly matter.

    Args:
        config: a Llama config dict (default :data:`TINY_LLAMA_CONFIG`).
        seed: seed of the runtime that draws the weights.
        runtimes: which models to return: ``"mlx"``, ``"hf"`` or both; both
            hold the same weights, copied by name.
        init: which runtime draws the weights: ``"mlx"`` (``mx.random``, no
            torch needed for an MLX-only model) or ``"torch"``
            (``torch.manual_seed``, after transformers' own init).
        attn_implementation: the HF model's attention (``"eager"``, ``"sdpa"``).
    """
    config = dict(TINY_LLAMA_CONFIG if config is None else config)
    if init not in ("mlx", "torch") or not set(runtimes) <= {"mlx", "hf"}:
        raise ValueError(f"init {init!r} or runtimes {runtimes!r} not understood")
    mlx_model = hf_model = None
    if init == "mlx" or "mlx" in runtimes:
        import mlx.core as mx
        from mlx_lm.models import llama

        if init == "mlx":
            mx.random.seed(seed)
        mlx_model = llama.Model(llama.ModelArgs.from_dict(config))
        if init == "mlx":
            _random_weights_mlx(mlx_model, seed)
    if init == "torch" or "hf" in runtimes:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        if init == "torch":
            torch.manual_seed(seed)
        hf_config = LlamaConfig(
            **{k: v for k, v in config.items() if k != "model_type"},
            attn_implementation=attn_implementation,
        )
        hf_model = LlamaForCausalLM(hf_config).to(torch.float32).eval()
        if init == "torch":
            _random_weights_torch(hf_model)
        hf_model.requires_grad_(False)
        hf_model.generation_config.eos_token_id = None  # random weights: no stop
    # copy the drawn weights, by name, into the other runtime
    if init == "torch" and mlx_model is not None:
        weights = [
            (name, mx.array(tensor.detach().numpy()))
            for name, tensor in hf_model.state_dict().items()
            if "rotary_emb" not in name
        ]
        mlx_model.load_weights(weights, strict=True)
    if init == "mlx" and hf_model is not None:
        from mlx.utils import tree_flatten

        state = {
            name: torch.from_numpy(np.array(p, copy=True))
            for name, p in tree_flatten(mlx_model.parameters())
        }
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary_emb" in m for m in missing)
    if mlx_model is not None:
        mlx_model.eval()
        mx.eval(mlx_model.parameters())
    return TinyTwins(
        mlx_model=mlx_model if "mlx" in runtimes else None,
        hf_model=hf_model if "hf" in runtimes else None,
        config=config,
    )


@pytest.fixture(scope="session")
def tiny_llama_twins() -> TinyTwins:
    """The same tiny Llama in both runtimes (torch draws, seed 0)."""
    return tiny_llama(runtimes=("mlx", "hf"), init="torch")


@pytest.fixture(scope="module")
def tiny_mlx():
    """A tiny MLX Llama (:data:`TINY_LLAMA_CONFIG`, mx.random draws, seed 0)."""
    return tiny_llama().mlx_model


@pytest.fixture(scope="module")
def tiny_hf():
    """A tiny transformers Llama (:data:`WIDE_HEAD_CONFIG`, sdpa, torch seed 0)."""
    return tiny_llama(
        WIDE_HEAD_CONFIG, runtimes=("hf",), init="torch", attn_implementation="sdpa"
    ).hf_model


@pytest.fixture(scope="module")
def wide_twins() -> TinyTwins:
    """:data:`WIDE_HEAD_CONFIG` in both runtimes (torch draws, seed 0)."""
    return tiny_llama(WIDE_HEAD_CONFIG, runtimes=("mlx", "hf"), init="torch")


# The default model's vocabulary and chat template around tiny random weights:
# a model folder every verb (and mlx_lm's own CLI) loads in a second.
TINY_CHAT_CONFIG = {**TINY_LLAMA_CONFIG, "vocab_size": 49152, "head_dim": 64}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, default_model_dir):
    """A model folder: tiny random Llama weights (mx.random, seed 0) with the
    default model's tokenizer and chat template."""
    import json
    import shutil

    from mlx_lm.utils import save_model

    folder = tmp_path_factory.mktemp("tiny-chat-model")
    model = tiny_llama(TINY_CHAT_CONFIG).mlx_model
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(TINY_CHAT_CONFIG))
    for name in _TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model's HF folder (converted from the GGUF on first use)."""
    from qkvshare_mlx.models import default_model_path

    return default_model_path()


# ----------------------------------------------------------------------------
# Quantization steps of a card's layer (reference codec)


def element_steps(layer, n_tokens):
    """|decode(code 1) - decode(code 0)| per element: (B, H, T, D) K and V steps.

    The step of each element's group (its float16-rounded scale), computed
    through the reference codec; 0 for float tokens.
    """
    from qkvshare_mlx.formats import Encoded
    from qkvshare_mlx.quant import numpy_backend as codec

    def step(enc, bits):
        if enc.layout == "float":
            return np.zeros(np.asarray(enc.data).shape, np.float32)
        codes = np.asarray(enc.codes)
        lead, n = codes.shape[:-1], codes.shape[-1] * 32 // bits
        scales, biases = np.asarray(enc.scales), np.asarray(enc.biases)

        def dec(c):
            packed = codec.pack_codes(np.full((*lead, n), c, np.uint8), bits)
            return codec.decode(
                Encoded(enc.layout, enc.group, packed, scales, biases, dim=enc.dim),
                bits,
            )

        return np.abs(dec(1) - dec(0))

    order = np.argsort(
        np.concatenate([np.asarray(s.index) for s in layer]), kind="stable"
    )
    k = np.concatenate([step(s.keys, s.bits) for s in layer], axis=2)[:, :, order]
    v = np.concatenate([step(s.values, s.vbits) for s in layer], axis=2)[:, :, order]
    assert k.shape[2] == n_tokens
    return k, v


# ----------------------------------------------------------------------------
# Agent chains on a tiny random Llama (tests of agents and of evals)

CHAIN_TASK = "a task of some length to make a context"


class TinyChat:
    """ChatFormat's interface over made-up token ids (the tiny model has no
    tokenizer): each turn is a fixed marker, then the instruction's ids."""

    eos = set()

    @staticmethod
    def _ids(text):
        return [3 + (ord(ch) % 90) for ch in text]

    def opening(self, task, instruction):
        return [1, *self._ids(task), 2, *self._ids(instruction), 2]

    def turn(self, instruction):
        return [2, *self._ids(instruction), 2]

    def text(self, ids):
        return " ".join(map(str, ids))


def tiny_agents(hops, n=6):
    """``hops`` middle agents and an answerer, ``n`` reply tokens each."""
    from qkvshare_mlx.agents import Agent

    middle = [Agent(f"a{k}", f"step {k}", max_tokens=n) for k in range(hops)]
    return middle, Agent("answer", "answer now", max_tokens=n)


def tiny_chain(model, handoff, hops=3, finals=None, **kw):
    """``run_chain`` of :func:`tiny_agents` over :data:`CHAIN_TASK`."""
    from qkvshare_mlx.agents import run_chain

    middle, answerer = tiny_agents(hops)
    return run_chain(
        model,
        None,
        TinyChat(),
        CHAIN_TASK,
        middle,
        answerer,
        handoff,
        finals=finals,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny():
    """A tiny MLX Llama for chains (:data:`CHAIN_LLAMA_CONFIG`, torch draws, seed 1)."""
    return tiny_llama(CHAIN_LLAMA_CONFIG, seed=1, init="torch").mlx_model


# ----------------------------------------------------------------------------
# The CLI, in a subprocess (as a user runs it)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any verb loads a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("qkvshare_mlx.models.load_model", refuse)


def run_cli(*args, input=None, env=None, timeout=300):
    """``python -m qkvshare_mlx ARGS``: the completed process (text)."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "qkvshare_mlx", *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_mlx_lm(*args, timeout=300):
    """``python -m mlx_lm ARGS``: mlx-lm's own CLI (completed process)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "mlx_lm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlx_lm_text(stdout: str) -> str:
    """The generated text ``mlx_lm generate`` prints between its ``=`` rules."""
    parts = stdout.split("==========\n")
    return parts[1].rstrip("\n") if len(parts) > 2 else stdout


# ----------------------------------------------------------------------------
# Cards of a tiny model's prefill, and the properties tests check on them


@pytest.fixture(scope="module")
def ids():
    """160 token ids of the tiny vocabulary (fixed seed)."""
    import numpy as np

    return np.random.default_rng(7).integers(0, TINY_LLAMA_CONFIG["vocab_size"], 160)


def prefill_card(
    model, toks, *, controller="uniform", budget=32, config=None, stats=True
):
    """``(card read back from its bytes, the sender's Prefill)`` of ``toks``:
    a lossless float32 card by default."""
    from qkvshare_mlx.capture import prefill
    from qkvshare_mlx.card import CacheCard
    from qkvshare_mlx.fingerprint import fingerprint
    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.quant.mlx_backend import quantize_cache

    pre = prefill(model, toks, probe_queries=16)
    qkv = quantize_cache(
        pre.keys,
        pre.values,
        controller=controller,
        budget_bits=budget,
        config=config or QuantConfig(float_dtype="float32"),
        stats=pre.stats if stats else None,
    )
    card = CacheCard.from_quantized(qkv, toks, fingerprint(model))
    return CacheCard.from_bytes(card.to_bytes()), pre


def assert_inherits(first, later, layers=None):
    """``later`` holds ``first``'s tokens and every segment of it bit for bit
    (in ``layers``, default all)."""
    import numpy as np

    assert later.tokens[: first.n_tokens].tolist() == first.tokens.tolist()
    pairs = list(zip(first.layers, later.layers, strict=True))
    for li in range(len(pairs)) if layers is None else layers:
        la, lb = pairs[li]
        assert len(lb) >= len(la)
        for sa, sb in zip(la, lb[: len(la)], strict=True):
            np.testing.assert_array_equal(sa.index, sb.index)
            for ea, eb in ((sa.keys, sb.keys), (sa.values, sb.values)):
                for name, arr in ea.arrays().items():
                    np.testing.assert_array_equal(arr, eb.arrays()[name])


def run_python(code: str, **env):
    """``python -c CODE`` with extra environment variables (completed process)."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


# ----------------------------------------------------------------------------
# Quantization error bounds (both backends)

U16 = 2.0**-11  # unit roundoff of float16 (10 stored mantissa bits)
U32 = 2.0**-24  # unit roundoff of float32


def outlier_data(shape, seed=0):
    """Random K/V with a loud channel (5): what per-group scales must handle."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    x[..., 5] *= 20  # an outlier channel
    return x


def per_element(a, group, layout, D):
    """Scales/biases (.., rows, groups) broadcast back to (B, H, n, D)."""
    import numpy as np

    a = np.repeat(np.asarray(a, dtype=np.float32), group, axis=-1)
    return np.swapaxes(a, -1, -2) if layout == "channel" else a


def rounding_slack(x, s, z, bits):
    """Float rounding allowed on top of the quantization step.

    The quantizer rounds its input to float16 (<= U16 |x|); dequantization
    ``s*q + z`` in float32 rounds twice (<= 2 U32 (|s| q + |x| + |z|)).
    """
    import numpy as np

    levels = (1 << bits) - 1
    return U16 * np.abs(x) + 2 * U32 * (np.abs(s) * levels + np.abs(x) + np.abs(z))
