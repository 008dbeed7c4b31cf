"""``qkvshare handoff``: hand a prompt's KV cache from one agent to another.

Sender (writes a card)::

    qkvshare handoff --sender-prompt "Natalia sold clips to..." --out q.qkv

Receiver (continues from a card)::

    qkvshare handoff --card q.qkv --receiver-prompt "Answer with a number."

Both in one run (the card is written, read back and validated in between)::

    qkvshare handoff --sender-prompt "..." --receiver-prompt "..." [--out q.qkv]

Prompts and chat templates: with a chat template (the default when the
tokenizer has one), the sender's prompt is the user's turn and the card
covers exactly that rendered turn. The receiver's tokens are the card's tokens
followed by the rendered continuation of the conversation: the receiver's
prompt as a next user turn (if given) and the assistant header. The
continuation is rendered as the difference between the template applied with
and without it, so any template that renders conversations prefix-stably
works; the receiver never re-tokenizes the card's text. With
``--no-chat-template`` the prompts are raw text, concatenated.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ..card import CacheCard
from ..errors import ConfigError
from ..formats import GROUP_SIZES, KEY_LAYOUTS, QuantConfig
from ..inject import MODES, POLICIES
from ..quant.controllers import CONTROLLERS, HandoffPlan
from ..rotation import ROTATIONS


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare handoff",
        description="Hand a prompt's KV cache from one agent to another as a card.",
    )
    p.add_argument("--model", help="model folder or hub id (default: embedded model)")
    p.add_argument(
        "--runtime",
        choices=("mlx", "hf"),
        default="mlx",
        help="run the model with mlx-lm or transformers (default: mlx)",
    )
    s = p.add_argument_group("sender")
    s.add_argument("--sender-prompt", help="the sender's prompt (the user's turn)")
    s.add_argument("--out", help="write the card to this file")
    s.add_argument(
        "--budget-bits",
        type=float,
        default=4.5,
        help="average stored bits per K/V element (default: 4.5)",
    )
    s.add_argument(
        "--controller",
        choices=sorted(CONTROLLERS),
        default="saliency",
        help="how widths are chosen per token (default: saliency)",
    )
    s.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=64,
        help="quantization group size (default: 64)",
    )
    s.add_argument(
        "--key-layout",
        choices=KEY_LAYOUTS,
        default="channel",
        help="group keys per channel (KIVI) or per token",
    )
    s.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default="none",
        help="rotate K/V by a Hadamard matrix before quantizing (lower error "
        "at 3-6 bits; power-of-two head dims)",
    )
    s.add_argument(
        "--hops-remaining",
        type=int,
        default=0,
        help="handoffs after the receiver (topology controller)",
    )
    r = p.add_argument_group("receiver")
    r.add_argument("--card", help="continue from this card file")
    r.add_argument("--receiver-prompt", help="the receiver's follow-up prompt")
    r.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    r.add_argument(
        "--mode",
        choices=MODES,
        default="dequantize",
        help="inject as float KVCache or keep compressed (mlx only)",
    )
    r.add_argument(
        "--policy",
        choices=POLICIES,
        default="prefix",
        help="prompt alignment policy (mlx only)",
    )
    p.add_argument(
        "--no-chat-template", action="store_true", help="treat prompts as raw text"
    )
    return p


# ----------------------------------------------------------------------------
# Prompt rendering


def _use_template(tokenizer, args) -> bool:
    return not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def sender_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    """The tokens a card covers: the rendered user turn, or the raw text."""
    if not chat:
        return _encode(tokenizer, text, True)
    return _encode(
        tokenizer, _render(tokenizer, [{"role": "user", "content": text}], False), False
    )


def receiver_suffix(tokenizer, text: str | None, chat: bool) -> list[int]:
    """Tokens the receiver appends to a card's tokens."""
    if not chat:
        return _encode(tokenizer, text, False) if text else []
    turn = [{"role": "user", "content": "X"}]
    base = _render(tokenizer, turn, False)
    more = turn + ([{"role": "user", "content": text}] if text else [])
    full = _render(tokenizer, more, True)
    if not full.startswith(base):
        # Template is not prefix-stable: append the prompt as raw text.
        return _encode(tokenizer, text, False) if text else []
    return _encode(tokenizer, full[len(base) :], False)


# ----------------------------------------------------------------------------
# Runtimes


def _quant_config(args) -> QuantConfig:
    return QuantConfig(
        group_size=args.group_size,
        key_layout=args.key_layout,
        key_group=args.group_size,
        rotation=args.rotation,
    )


def _load(args):
    if args.runtime == "hf":
        from qkvshare_converters.hf_model import load_hf_model

        return load_hf_model(args.model)
    from ..models import load_model

    return load_model(args.model)


def _make_card(model, tokenizer, ids, args, user) -> CacheCard:
    plan = HandoffPlan(hops_remaining=args.hops_remaining)
    if args.runtime == "hf":
        from qkvshare_converters.hf_cache import dynamic_cache_to_card, hf_prefill

        cache, stats, _ = hf_prefill(model, ids)
        return dynamic_cache_to_card(
            cache,
            ids,
            model,
            tokenizer,
            controller=args.controller,
            budget_bits=args.budget_bits,
            config=_quant_config(args),
            stats=stats,
            plan=plan,
            user=user,
        )
    from ..handoff import make_card

    return make_card(
        model,
        tokenizer,
        ids,
        controller=args.controller,
        budget_bits=args.budget_bits,
        config=_quant_config(args),
        plan=plan,
        user=user,
    )


def _continue(card, model, tokenizer, ids, args) -> tuple[list[int], dict]:
    if args.runtime == "hf":
        from qkvshare_converters.hf_cache import continue_hf

        tic = time.perf_counter()
        tokens = continue_hf(card, model, tokenizer, ids, max_tokens=args.max_tokens)
        return tokens, {
            "total_ms": 1000 * (time.perf_counter() - tic),
            "cache_class": "DynamicCache",
        }
    from ..handoff import continue_from_card

    return continue_from_card(
        card,
        model,
        tokenizer,
        ids,
        mode=args.mode,
        max_tokens=args.max_tokens,
        policy=args.policy,
    )


def _card_summary(card: CacheCard) -> str:
    hist = ", ".join(
        f"{'f' if b == 16 else ''}{b}b:{n}" for b, n in card.width_histogram().items()
    )
    ratio = card.fp16_bytes / max(card.payload_bytes, 1)
    return (
        f"card: {card.n_tokens} tokens, {card.cache['n_layers']} layers, "
        f"{card.effective_bits:.3f} bits/element, {card.payload_bytes / 1e6:.3f} MB "
        f"({ratio:.1f}x smaller than fp16), controller {card.quant.get('controller')}"
        f", widths (tokens x layers) {hist}, sha256 {card.checksum()[:12]}"
    )


# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if not args.sender_prompt and not args.card:
        raise ConfigError("handoff: expected --sender-prompt or --card")
    if args.sender_prompt and args.card:
        raise ConfigError("handoff: give --sender-prompt or --card, not both")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 but got {args.max_tokens}")
    if args.runtime == "hf" and args.mode != "dequantize":
        raise ConfigError(f"--mode {args.mode} needs --runtime mlx")
    model, tokenizer = _load(args)
    receive = bool(args.card or args.receiver_prompt or not args.out)

    if args.sender_prompt:
        chat = _use_template(tokenizer, args)
        ids = sender_tokens(tokenizer, args.sender_prompt, chat)
        tic = time.perf_counter()
        card = _make_card(
            model, tokenizer, ids, args, user={"role": "sender", "chat_template": chat}
        )
        print(f"sender: prefill + quantize {1000 * (time.perf_counter() - tic):.0f} ms")
        path = Path(args.out) if args.out else None
        if path is None:
            fd, tmp = tempfile.mkstemp(suffix=".qkv")
            os.close(fd)
            path = Path(tmp)
        try:
            card.save(path)
            # The receiver always reads the card back from bytes, validated.
            card = CacheCard.load(path)
        finally:
            if not args.out:
                path.unlink(missing_ok=True)
        if args.out:
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    else:
        card = CacheCard.load(args.card)
        chat = bool(card.user.get("chat_template", _use_template(tokenizer, args)))
    print(_card_summary(card))
    if not receive:
        return 0

    ids = card.tokens.tolist() + receiver_suffix(tokenizer, args.receiver_prompt, chat)
    tokens, info = _continue(card, model, tokenizer, ids, args)
    print("receiver:", tokenizer.decode(tokens))
    timing = (
        f"TTFT {info['ttft_ms']:.1f} ms, reused {info['n_reused']} tokens, "
        f"prefilled {info['n_prefilled']}"
        if "ttft_ms" in info
        else f"total {info['total_ms']:.1f} ms"
    )
    print(f"receiver: {len(tokens)} tokens, {timing}, cache {info['cache_class']}")
    return 0
