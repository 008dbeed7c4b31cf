"""One rank of a two-process handoff over mx.distributed (used by test_distributed).

Run with ``MLX_RANK`` and ``MLX_HOSTFILE`` set (as ``mlx.launch --backend ring``
does): ``python tests/dist_worker.py SCENARIO [--timeout S]``. Rank 0 is the
sender, rank 1 the receiver. Scenarios:

- ``handoff``: rank 0 makes a card from a tiny random-weight Llama and sends it;
  rank 1 receives it, continues greedily for 16 tokens and prints one line
  ``RESULT {json}``.
- ``silent``: rank 0 joins the ring and never sends (it sleeps until killed).
- ``die``: rank 0 joins the ring and exits without sending.
- ``corrupt``: rank 0 sends a header for a valid card, then altered bytes, then
  the card intact; rank 1 rejects the first and prints ``RESENT {json}``.
- ``signed``: both ranks hold ``CARD_KEY``; rank 0 sends the card unsigned,
  signed with another key, then signed with ``CARD_KEY``; rank 1 prints
  ``REFUSED <error>`` for each of the first two and ``SIGNED {json}``.

Rank 1 exits with a code per outcome (see ``EXIT_CODES``) so the test can tell
a timeout from a checksum failure from a crash.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qkvshare_mlx  # noqa: E402

qkvshare_mlx.enable_openblas()  # before mlx is imported

EXIT_OK = 0
EXIT_TIMEOUT = 3
EXIT_INTEGRITY = 4
EXIT_TRANSPORT = 5
EXIT_CODES = {
    "TransportTimeoutError": EXIT_TIMEOUT,
    "CardIntegrityError": EXIT_INTEGRITY,
    "TransportError": EXIT_TRANSPORT,
}

SEED = 0
CARD_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONTEXT_TOKENS = 48
MAX_TOKENS = 16
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def build_tiny_model(seed: int = SEED):
    """A float32 mlx-lm Llama whose weights depend only on ``seed`` (numpy RNG)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(TINY_CONFIG))
    rng = np.random.default_rng(seed)
    weights = []
    for name, p in tree_flatten(model.parameters()):
        w = rng.standard_normal(p.shape, dtype=np.float32)
        w = 1.0 + 0.1 * w if name.endswith("norm.weight") else 0.2 * w
        weights.append((name, mx.array(w)))
    model.load_weights(weights, strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def prompts(seed: int = SEED) -> tuple[list[int], list[int]]:
    """(sender's context, receiver's prompt = context + its own question)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(0, TINY_CONFIG["vocab_size"], size=CONTEXT_TOKENS + 8).tolist()
    return ids[:CONTEXT_TOKENS], ids


def make_card(model):
    from qkvshare_mlx.handoff import make_card

    context, _ = prompts()
    return make_card(model, None, context, controller="saliency", budget_bits=4.5)


def continue_from(card, model) -> list[int]:
    from qkvshare_mlx.handoff import continue_from_card

    _, prompt = prompts()
    return continue_from_card(card, model, None, prompt, max_tokens=MAX_TOKENS).tokens


def synthetic_card():
    """A small valid card from random K/V (no model, so no mlx-lm import)."""
    import mlx.core as mx
    import numpy as np

    from qkvshare_mlx.card import CacheCard
    from qkvshare_mlx.quant.mlx_backend import quantize_cache

    rng = np.random.default_rng(SEED)
    shape = (1, 2, CONTEXT_TOKENS, 32)  # (B, H, T, D)
    kv = [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4)]
    qkv = quantize_cache(kv[:2], kv[2:], controller="uniform", budget_bits=4.5)
    return CacheCard.from_quantized(qkv, np.arange(CONTEXT_TOKENS), {"n_layers": 2})


def sender(scenario: str, transport) -> None:
    if scenario == "silent":
        time.sleep(120)  # the test kills this process
        return
    if scenario == "die":
        time.sleep(0.5)  # let the receiver finish joining the ring, then vanish
        os._exit(1)
    if scenario == "handoff":
        transport.send(make_card(build_tiny_model()), 1, timeout=60)
    elif scenario == "corrupt":
        from qkvshare_mlx.distributed import encode_header

        card = synthetic_card()
        data = card.to_bytes()
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x01
        header = encode_header(data, chunk_bytes=transport.chunk_bytes)
        transport.send_bytes(bytes(bad), 1, header=header, timeout=60)
        transport.send(card, 1, timeout=60)  # the link is still in step: resend
    elif scenario == "signed":
        card = synthetic_card()
        for key in (None, OTHER_KEY):
            transport.send_bytes(card.to_bytes(key=key), 1, timeout=60)
        transport.send(card, 1, timeout=60)  # signed with the transport's key


def receiver(scenario: str, transport, timeout: float) -> int:
    from qkvshare_mlx.card import CacheCard
    from qkvshare_mlx.errors import QKVShareError

    # The receiver's own copy of the same model (the failure scenarios skip it).
    model = build_tiny_model() if scenario == "handoff" else None
    if scenario == "signed":
        from qkvshare_mlx.errors import CardAuthError

        for _ in range(2):
            try:
                transport.recv(0, timeout=timeout)
            except CardAuthError as e:
                print(f"REFUSED {type(e).__name__}: {e}", flush=True)
        card = transport.recv(0, timeout=timeout)
        print(
            "SIGNED "
            + json.dumps({"checksum": card.checksum(), "key_id": card.key_id}),
            flush=True,
        )
        return EXIT_OK
    start = time.monotonic()
    try:
        data = transport.recv_bytes(0, timeout=timeout)
        card = CacheCard.from_bytes(data)
    except QKVShareError as e:
        elapsed = time.monotonic() - start
        print(f"ERROR {type(e).__name__} after {elapsed:.2f} s: {e}", flush=True)
        code = EXIT_CODES.get(type(e).__name__, 1)
        if scenario == "corrupt":  # the sender resends the card intact
            card = transport.recv(0, timeout=timeout)
            print("RESENT " + json.dumps({"checksum": card.checksum()}), flush=True)
        return code
    tokens = continue_from(card, model)
    result = {"tokens": tokens, "checksum": card.checksum(), "bytes": len(data)}
    print("RESULT " + json.dumps(result), flush=True)
    return EXIT_OK


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", choices=["handoff", "silent", "die", "corrupt", "signed"]
    )
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    from qkvshare_mlx.distributed import DistributedTransport, init_group

    # Small chunks, so the card crosses the link in several messages.
    key = CARD_KEY if args.scenario == "signed" else None
    transport = DistributedTransport(init_group("ring"), chunk_bytes=4096, key=key)
    if transport.rank == 0:
        sender(args.scenario, transport)
        return EXIT_OK
    return receiver(args.scenario, transport, args.timeout)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A receive abandoned on timeout may still block a daemon thread inside MLX;
    # skip interpreter teardown so nothing waits on it.
    os._exit(code)
