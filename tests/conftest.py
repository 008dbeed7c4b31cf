"""Shared fixtures: tiny random-weight twin models and the real default model.

``tiny_llama_twins`` is tier (b) of the test plan: one small Llama with the SAME
float32 weights in MLX (mlx-lm) and in transformers, so that anything one runtime
produces (logits, KV caches, cards) can be checked against the other in
milliseconds. ``default_model_dir`` is tier (c): the real embedded model (slow).
"""

from dataclasses import dataclass

import pytest

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before anything imports mlx

TINY_LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # a multiple of the quantizer group sizes
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


@dataclass
class TinyTwins:
    """The same tiny Llama in both runtimes (float32, eval mode)."""

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


def build_tiny_llama_twins(seed: int = 0, config: dict | None = None) -> TinyTwins:
    """Build an HF Llama with random weights and copy them, by name, into MLX."""
    import mlx.core as mx
    import torch
    from mlx_lm.models import llama
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(TINY_LLAMA_CONFIG if config is None else config)
    torch.manual_seed(seed)
    hf_config = LlamaConfig(
        **{k: v for k, v in config.items() if k != "model_type"},
        attn_implementation="eager",
    )
    hf_model = LlamaForCausalLM(hf_config).to(torch.float32).eval()
    # HF's init (std 0.02) makes near-uniform logits that hide mistakes; use
    # weights large enough that attention and RoPE visibly matter.
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))

    mlx_model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = [
        (name, mx.array(tensor.detach().numpy()))
        for name, tensor in hf_model.state_dict().items()
        if "rotary_emb" not in name
    ]
    mlx_model.load_weights(weights, strict=True)
    mlx_model.eval()
    mx.eval(mlx_model.parameters())
    return TinyTwins(mlx_model=mlx_model, hf_model=hf_model, config=config)


@pytest.fixture(scope="session")
def tiny_llama_twins() -> TinyTwins:
    return build_tiny_llama_twins(seed=0)


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model's HF folder (converted from the GGUF on first use)."""
    from qkvshare_mlx.models import default_model_path

    return default_model_path()


# ----------------------------------------------------------------------------
# Agent chains on a tiny random Llama (tests of agents and of evals)

# wider than the twins (hidden_size 128); head_dim a multiple of the quantizer's groups
CHAIN_LLAMA_CONFIG = {**TINY_LLAMA_CONFIG, "head_dim": 32, "hidden_size": 128}
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
    """The MLX half of a tiny Llama (seed 1, :data:`CHAIN_LLAMA_CONFIG`)."""
    return build_tiny_llama_twins(seed=1, config=CHAIN_LLAMA_CONFIG).mlx_model
