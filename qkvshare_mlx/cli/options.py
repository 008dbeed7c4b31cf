"""Flags shared by the verbs, named as mlx-lm names them, and the checks that
run before any model is loaded (paths, budgets, contradictory flags).

Each ``add_*`` adds one group of flags to a parser; each ``check_*`` raises
ConfigError (one line, exit 2) on what it can tell from the arguments alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..formats import (
    ALL_BITS,
    CODE_BITS,
    GROUP_SIZES,
    KEY_ERRORS,
    KEY_LAYOUTS,
    QuantConfig,
    widths_from,
)
from ..generation import SamplingOptions
from ..quant.allocator import validate_budget
from ..quant.controllers import CONTROLLERS, HandoffPlan
from ..rotation import ROTATIONS, fits

# The widest per-token group any head size allows: the cheapest formats a
# model can reach (a model whose head size is smaller reaches fewer).
_BEST_CASE_HEAD_DIM = max(GROUP_SIZES)


def add_model(p: argparse.ArgumentParser, *, card_default: bool = False) -> None:
    default = "the model the card names" if card_default else "the embedded model"
    p.add_argument("--model", help=f"model folder or hub id (default: {default})")
    p.add_argument(
        "--runtime",
        choices=("mlx", "hf"),
        default="mlx",
        help="run the model with mlx-lm or transformers (default: mlx)",
    )


def add_prompt(p: argparse.ArgumentParser, *, sender: bool) -> None:
    p.add_argument(
        "-p",
        "--prompt",
        required=sender,
        help="the prompt ('-' reads it from stdin)",
    )
    if sender:  # a receiver continues the card's conversation as it is
        p.add_argument("--system-prompt", help="a system prompt before the prompt")
        p.add_argument(
            "--no-chat-template",
            action="store_true",
            help="treat prompts as plain text (also for models without a template)",
        )


# The recommended card: the cheapest setting that reaches 0.99 teacher-forced
# top-1 on the 150-problem evaluation set: saliency + Hadamard + split K/V +
# pre-RoPE keys + no 2-bit token, layers weighted by the model's sensitivity
# profile (--layer-weights auto), at 5.5 bits (0.994; without the profile
# 0.986, and 6 bits were needed: bench/results/fidelity_search.json, README
# "Fidelity search"). Below 6 bits keys wider than values win on KL and
# top-1; at 6 they did not (top-1 0.985 against 0.994), so the split is
# recommended below 6 only.
RECOMMENDED_BUDGET = 5.5
RECOMMENDED_ROTATION = "hadamard"
SPLIT_KV_BELOW = 6.0
PRE_ROPE_BELOW = 6.0  # keys before RoPE: less error at 3-5.5 bits, none at 6
# From 4.5 bits up no token gets 2-bit codes: the error model spends them on
# the least-attended tokens, and top-1 disagrees (KL -18% at 4.5 bits)
MIN_BITS_3_FROM = 4.5


def add_card(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("card")
    g.add_argument(
        "--budget-bits",
        type=float,
        default=RECOMMENDED_BUDGET,
        help="average stored bits per K/V element, scales and biases included "
        "(4.5 is about mlx-lm's --kv-bits 4 with --kv-group-size 64; reachable: "
        f"2.25 to 16, less for small head dims; default: {RECOMMENDED_BUDGET:g}, "
        "the cheapest setting at 0.99 teacher-forced top-1 on GSM8K chains)",
    )
    g.add_argument(
        "--controller",
        choices=sorted(CONTROLLERS),
        default="saliency",
        help="how widths are chosen per token (default: saliency)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=64,
        help="quantization group size (mlx-lm's --kv-group-size; default: 64)",
    )
    g.add_argument(
        "--key-layout",
        choices=KEY_LAYOUTS,
        default="channel",
        help="group keys per channel (KIVI, default) or per token",
    )
    g.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default=None,
        help="rotate K/V by a Hadamard matrix before quantizing (lower error "
        f"at 3-6 bits; power-of-two head dims). Default: {RECOMMENDED_ROTATION} "
        "below 16 bits, none for a lossless card, and a card handed on keeps "
        "the rotation of the card it inherits",
    )
    g.add_argument(
        "--split-kv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let tokens give their keys more bits than their values (keys "
        f"carry most of the error; format version 3). Default: on below "
        f"{SPLIT_KV_BELOW:g} bits",
    )
    g.add_argument(
        "--min-bits",
        type=int,
        choices=CODE_BITS,
        default=None,
        help="the narrowest code width a token may get. Default: 3 from "
        f"{MIN_BITS_3_FROM:g} bits up (to just below 16), else 2",
    )
    g.add_argument(
        "--pin-sinks",
        type=int,
        default=0,
        metavar="N",
        help="keep the cache's first N tokens (attention sinks) in float; "
        "they count in the budget",
    )
    g.add_argument(
        "--pin-recent",
        type=int,
        default=0,
        metavar="N",
        help="keep the last N tokens quantized at this hop in float; they "
        "count in the budget",
    )
    g.add_argument(
        "--key-error",
        choices=KEY_ERRORS,
        default="mse",
        help="how the allocator measures a key's error: the key vector's "
        "squared error (mse), or its logits' for the sender's last queries "
        "(query: helps unrotated cards; see the README's fidelity search)",
    )
    g.add_argument(
        "--pre-rope",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the keys before RoPE (each rotated back by its position; "
        "the receiver rotates it forward): lower error at the same bits, a "
        "version-4 card, received in mode dequantize or stream, not compressed. "
        f"Default: on below {PRE_ROPE_BELOW:g} bits where the model's RoPE can "
        "be read (not with --key-error query), and a card handed on keeps the "
        "choice of the card it inherits",
    )
    add_layer_weights(g)
    g.add_argument(
        "--hops-remaining",
        type=int,
        default=0,
        help="handoffs after the receiver (topology controller)",
    )


def add_generation(p: argparse.ArgumentParser, *, max_tokens: bool = True) -> None:
    g = p.add_argument_group("generation")
    if max_tokens:
        g.add_argument(
            "-m",
            "--max-tokens",
            type=int,
            default=256,
            help="most tokens to generate (default: 256)",
        )
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling")
    g.add_argument("--min-p", type=float, default=0.0, help="min-p sampling")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument(
        "--verbose",
        action="store_true",
        help="print prompt and generation tokens/s and peak memory",
    )


def add_security(p: argparse.ArgumentParser, *, receiver: bool) -> None:
    g = p.add_argument_group("identity and authentication")
    g.add_argument(
        "--card-key-file",
        help="a file holding the shared card key (hex): cards written are "
        "signed, cards read must be signed with it (default: $QKVSHARE_CARD_KEY; "
        "neither: unsigned)",
    )
    if receiver:
        g.add_argument(
            "--allow-other-weights",
            action="store_true",
            help="accept a card made with other weights of the same model "
            "(e.g. base -> LoRA merge); refused by default",
        )


def card_key(args):
    """The key of ``--card-key-file`` or ``$QKVSHARE_CARD_KEY``, or None."""
    from ..card.auth import load_key

    return load_key(key_file=getattr(args, "card_key_file", None))


def prompt_text(value: str | None) -> str | None:
    """The prompt flag's text: ``-`` reads stdin (as mlx-lm's ``-p -``)."""
    if value == "-":
        return sys.stdin.read()
    return value


def sampling(args) -> SamplingOptions:
    """The sampling flags; ``--seed`` is applied by :func:`seed_now`."""
    return SamplingOptions(
        temp=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k
    )


def seed_now(args) -> None:
    """Seed ``mx.random`` where ``mlx_lm.generate`` does: before the model is
    loaded (building it draws initial weights), so that with the same seed
    and cache both sample the same tokens."""
    if getattr(args, "seed", None) is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)


def quant_config(args, inherited=None, head_dims=None, model=None) -> QuantConfig:
    """The card settings of the flags; unset ones take the recommended
    setting (:func:`recommended_config`). A card handed on keeps
    ``inherited``'s rotation and pre-RoPE keys (a card has one of each).
    ``--pre-rope`` reads the RoPE of ``model`` (an mlx-lm or transformers
    model; without one, e.g. before loading it, the setting is left out)."""
    rotation = args.rotation
    if rotation is None and inherited is not None:
        rotation = inherited.qkv.config.rotation
    key_rope = None if inherited is None else inherited.qkv.config.key_rope
    asked = getattr(args, "pre_rope", None)
    if inherited is not None and asked is not None and asked != (key_rope is not None):
        held = "before RoPE" if key_rope is not None else "as cached"
        raise ConfigError(
            f"--{'' if asked else 'no-'}pre-rope: the inherited card holds its "
            f"keys {held}, and a card keeps one way"
        )
    if asked is None:  # recommended, where it can apply
        asked = recommended_pre_rope(args.budget_bits) and (
            getattr(args, "key_error", "mse") != "query"
        )
        if asked and model is not None and inherited is None:
            key_rope = recommended_key_rope(model)
    elif asked and model is not None and inherited is None:
        try:
            key_rope = _key_rope(model)
        except ConfigError as e:
            raise ConfigError(f"--pre-rope: {e}") from None
    auto = recommended_config(args.budget_bits, head_dims)
    min_bits = getattr(args, "min_bits", None)
    return QuantConfig(
        group_size=args.group_size,
        key_layout=args.key_layout,
        key_group=args.group_size,
        rotation=auto.rotation if rotation is None else rotation,
        split_kv=auto.split_kv if args.split_kv is None else args.split_kv,
        widths=auto.widths if min_bits is None else widths_from(min_bits),
        pin_sinks=getattr(args, "pin_sinks", 0),
        pin_recent=getattr(args, "pin_recent", 0),
        key_error=getattr(args, "key_error", "mse"),
        key_rope=key_rope,
    )


AUTO = "auto"


def add_layer_weights(g) -> None:
    g.add_argument(
        "--layer-weights",
        metavar="PROFILE",
        default=AUTO,
        help="a layer sensitivity profile of the model (made by qkvshare "
        "calibrate): the allocator weighs each layer's key and value errors by "
        "it (less KL at the same bits; README, fidelity search). 'none': every "
        "layer alike. Default: auto, the profile shipped for the model's "
        "architecture where there is one",
    )


def sensitivity(args):
    """The ``--layer-weights`` setting before the model loads: a profile read
    from its file (a bad file fails fast; its layer count is checked against
    the model when the card is made), None for ``none``, or :data:`AUTO`."""
    path = getattr(args, "layer_weights", AUTO)
    if path in (None, "none"):
        return None
    if path == AUTO:
        return AUTO
    from ..sensitivity import LayerSensitivity

    return LayerSensitivity.load(path)


def model_sensitivity(sens, model):
    """:func:`sensitivity`'s setting for a loaded ``model``: :data:`AUTO`
    becomes the profile shipped for its architecture, or None (with a note
    on stderr); a profile from a file must fit the model's architecture
    (ConfigError before any work is done)."""
    if sens != AUTO:
        if sens is not None:
            sens.check_model(model)
        return sens
    from ..sensitivity import shipped_profile

    prof = shipped_profile(model)
    if prof is None:
        print(
            "note: no layer sensitivity profile ships for this model's "
            "architecture; every layer weighs alike (qkvshare calibrate makes one)",
            file=sys.stderr,
        )
    return prof


def recommended_pre_rope(budget_bits: float) -> bool:
    """Whether the recommended settings quantize keys before RoPE at this
    budget (below ``PRE_ROPE_BELOW`` bits; see the README's fidelity search)."""
    return budget_bits < PRE_ROPE_BELOW


def recommended_model_config(
    budget_bits: float, model, *, compressed: bool = False
) -> QuantConfig:
    """:func:`recommended_config` for ``model``'s head sizes, with its keys
    before RoPE below ``PRE_ROPE_BELOW`` bits (not for ``compressed``
    receivers, which attend on the codes)."""
    config = recommended_config(budget_bits, head_dims(model))
    if compressed or not recommended_pre_rope(budget_bits):
        return config
    return dataclasses.replace(config, key_rope=recommended_key_rope(model))


def recommended_key_rope(model):
    """``model``'s KeyRope, or None where it cannot be read (the recommended
    setting falls back to keys as cached, as the rotation does for head
    sizes it does not fit)."""
    try:
        return _key_rope(model)
    except (ConfigError, TypeError, ValueError, AttributeError, RuntimeError):
        return None  # a RoPE module of another shape: keys as cached


def _key_rope(model):
    import mlx.nn as nn

    if isinstance(model, nn.Module):
        from ..rope import from_mlx_model

        return from_mlx_model(model)
    from qkvshare_converters.hf_cache import key_rope_of  # a transformers model

    return key_rope_of(model)


def recommended_config(budget_bits: float, head_dims=None) -> QuantConfig:
    """The recommended settings for a budget: Hadamard rotation (where the
    head dims are powers of two), keys wider than values below
    ``SPLIT_KV_BELOW`` bits, and no 2-bit tokens from ``MIN_BITS_3_FROM``
    bits up; a lossless card (16 bits or more) is stored unrotated, so it
    is exact."""
    lossless = budget_bits >= 16
    fit = all(fits(RECOMMENDED_ROTATION, d) for d in head_dims or ())
    return QuantConfig(
        rotation=RECOMMENDED_ROTATION if fit and not lossless else "none",
        split_kv=budget_bits < SPLIT_KV_BELOW,
        widths=widths_from(recommended_min_bits(budget_bits)),
    )


def recommended_min_bits(budget_bits: float) -> int:
    """The narrowest code width of the recommended settings at a budget."""
    return 3 if MIN_BITS_3_FROM <= budget_bits < 16 else min(CODE_BITS)


def head_dims(model) -> tuple[int, int]:
    """(D_k, D_v) of an mlx-lm or transformers model (from its fingerprint)."""
    from ..fingerprint import fingerprint

    d = fingerprint(model)["head_dim"]
    return d, d


def plan(args) -> HandoffPlan:
    if args.hops_remaining < 0:
        raise ConfigError(
            f"--hops-remaining must be >= 0 but got {args.hops_remaining}"
        )
    return HandoffPlan(hops_remaining=args.hops_remaining)


def check_budget(args) -> None:
    """The budget against the formats' reachable range, before any load.

    A model's head size can narrow the range (checked again on the cache);
    the card's effective bits are checked after quantizing.
    """
    check_budget_value(args.budget_bits, quant_config(args))


def check_budget_value(budget_bits, config: QuantConfig) -> None:
    """:func:`check_budget` for a budget and config given directly."""
    formats = config.menu(_BEST_CASE_HEAD_DIM)
    try:
        validate_budget(budget_bits, formats, config.float_bits)
    except ConfigError as e:
        raise ConfigError(f"--budget-bits: {e}") from None


def check_card_meets_budget(card, budget_bits: float, inherited=None) -> None:
    """A card whose new tokens (those not ``inherited``) take more than 0.02
    bits over the budget is an error, not a file."""
    bits, elements = 8 * card.payload_bytes, card.n_elements
    if inherited is not None:
        bits -= 8 * inherited.payload_bytes
        elements -= inherited.n_elements
    effective = bits / max(elements, 1)
    if effective > budget_bits + 0.02:
        raise ConfigError(
            f"--budget-bits {budget_bits}: the cheapest card this cache allows "
            f"stores {effective:.3f} effective bits (head dims and per-channel "
            f"tails limit the formats; widths {sorted(ALL_BITS)})"
        )


def model_of(card, flag: str | None) -> str | None:
    """``--model``, else the model the card names (a path or hub id string)."""
    named = card.user.get("model")
    if flag is None and named is not None and not isinstance(named, str):
        raise ConfigError(f"card user.model: expected a string, got {named!r:.40}")
    return flag or named


def recorded_model(flag: str | None) -> dict:
    """What a card records of ``--model``: the resolved folder (or hub id)."""
    if not flag:
        return {}
    path = Path(flag).expanduser()
    return {"model": str(path.resolve()) if path.exists() else flag}


def check_readable(path: str, what: str) -> Path:
    """``path`` is a readable regular file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {path}: no such file")
    if not p.is_file():
        raise ConfigError(f"{what} {path}: not a regular file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} {path}: not readable")
    return p


def check_writable(path: str, what: str) -> Path:
    """A file can be written at ``path``: its folder exists and is writable,
    and it is not a folder itself."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path}: is a folder, expected a file path")
    folder = p.parent
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: folder {folder} is not writable")
    return p


def size_line(card, file_bytes: int) -> str:
    """The one size figure every verb prints: file bytes against fp16 K/V
    (:func:`qkvshare_mlx.conversation.card_size`)."""
    from ..conversation import card_size

    s = card_size(card, file_bytes)
    return (
        f"{s['file_bytes']:,} bytes, {s['x_smaller_than_fp16']:.2f}x smaller than "
        f"its fp16 K/V ({s['fp16_bytes']:,} bytes; payload {s['payload_bytes']:,}), "
        f"{s['effective_bits']:.3f} effective bits"
    )


def progress_printer(args):
    """A ``(processed, total)`` callback printing the prefill's progress on
    stderr (a terminal, or ``--verbose``), or None."""
    if not (getattr(args, "verbose", False) or sys.stderr.isatty()):
        return None
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        print(
            f"\rprefill {done}/{total} tokens ({rate:.0f} tokens/s)",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return show


def stream_text(text: str) -> None:
    """Print a piece of generated text as it arrives (``on_text``)."""
    print(text, end="", flush=True)


def end_stream(gen, args) -> None:
    """Close the streamed reply's line; with ``--verbose``, its figures."""
    print(flush=True)
    if getattr(args, "verbose", False):
        print("\n".join(stats_lines(gen)), file=sys.stderr)


def stats_lines(gen) -> list[str]:
    """mlx-lm's ``--verbose`` figures for a generation."""
    out = []
    if gen.prompt_tps is not None:
        out.append(
            f"Prompt: {gen.n_prefilled} tokens ({gen.n_reused} from the card), "
            f"{gen.prompt_tps:.3f} tokens-per-sec"
        )
    if gen.generation_tps is not None:
        out.append(
            f"Generation: {len(gen.tokens)} tokens, "
            f"{gen.generation_tps:.3f} tokens-per-sec"
        )
    if gen.ttft_ms is not None:
        out.append(f"TTFT: {gen.ttft_ms:.1f} ms")
    if gen.peak_memory_gb is not None:
        out.append(f"Peak memory: {gen.peak_memory_gb:.3f} GB")
    return out
