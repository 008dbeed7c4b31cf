"""``qkvshare convert IN OUT``: a card <-> an mlx-lm prompt-cache file.

    qkvshare convert planner.qkv cache.safetensors     # for mlx_lm.generate
    mlx_lm.cache_prompt --model M -p "..." --prompt-cache-file cache.safetensors
    qkvshare convert cache.safetensors planner.qkv -p "..."   # the same prompt

The direction follows IN: a CacheCard becomes a prompt-cache file that
``mlx_lm.generate --prompt-cache-file`` accepts (its ``model`` and
``tokenizer_config`` metadata included; the card's codes kept as mlx-lm's
``QuantizedKVCache`` where they are exactly that, else dequantized); a
prompt-cache file becomes a card, quantized under ``--budget-bits`` (16:
lossless). A file from ``mlx_lm.cache_prompt`` does not record its token
ids: give the prompt it was made from (``-p``), rendered as cache_prompt
renders it, and its length is checked against the cache.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

from ..errors import CardError, ConfigError
from . import options


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare convert",
        description="Convert a CacheCard to an mlx-lm prompt-cache file, or back.",
    )
    p.add_argument("input", help="a card, or an mlx-lm prompt-cache file")
    p.add_argument("output", help="the file to write")
    p.add_argument("--model", help="the model (default: the card's, or embedded)")
    p.add_argument("-p", "--prompt", help="(prompt-cache file in) the prompt it caches")
    p.add_argument(
        "--float",
        action="store_true",
        help="(card in) always write dequantized KVCache layers",
    )
    options.add_card(p)
    options.add_security(p, receiver=True)
    return p


def _is_card(path: Path) -> bool:
    """Whether ``path`` is a CacheCard (by its safetensors metadata), else a
    prompt-cache file; anything that is neither is an error."""
    from ..card import FORMAT_NAME
    from ..card.container import MAX_HEADER_BYTES, parse_json

    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= MAX_HEADER_BYTES:
            raise ConfigError(f"{path}: neither a CacheCard nor a safetensors file")
        try:
            header = parse_json(f.read(n).decode("utf-8", "replace"), str(path))
        except CardError as e:
            raise ConfigError(f"{path}: not a safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    src = options.check_readable(args.input, "input")
    dst = options.check_writable(args.output, "output")
    if _is_card(src):
        return _card_to_file(args, src, dst)
    options.check_budget(args)
    if args.pre_rope:  # the model is read for its fingerprint only, never run
        raise ConfigError(
            "--pre-rope: convert does not load the model's RoPE; make the card "
            "with make-card or generate"
        )
    return _file_to_card(args, src, dst)


def _model_dir(model_arg) -> str:
    from ..models import resolve_model

    return resolve_model(model_arg)


def _card_to_file(args, src: Path, dst: Path) -> int:
    from qkvshare_converters.mlx_prompt_cache import card_to_prompt_cache_file

    from ..card import CacheCard

    card = CacheCard.load(src, key=options.card_key(args))
    model = _model_dir(options.model_of(card, args.model))
    card.check_model(_fingerprint(model), allow_other_weights=args.allow_other_weights)
    meta = {"model": model, "tokenizer_config": json.dumps({})}
    card_to_prompt_cache_file(
        card, dst, quantized=False if args.float else None, metadata=meta
    )
    print(
        f"wrote {dst}: mlx-lm prompt cache of {card.n_tokens} tokens", file=sys.stderr
    )
    return 0


def _fingerprint(model_dir: str) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ..fingerprint import fingerprint

    return fingerprint(model_dir, load_tokenizer(Path(model_dir)))


def _file_to_card(args, src: Path, dst: Path) -> int:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from qkvshare_converters.mlx_prompt_cache import (
        TOKENS_KEY,
        prompt_cache_file_to_card,
    )

    from ..caches import load_prompt_cache
    from ..conversation import start

    _, meta = load_prompt_cache(str(src), return_metadata=True)
    model = _model_dir(args.model or meta.get("model"))
    tokenizer = load_tokenizer(Path(model))
    tokens, user = None, {"model": model} if (args.model or meta.get("model")) else {}
    if TOKENS_KEY not in meta:
        prompt = options.prompt_text(args.prompt)
        if prompt is None:
            raise ConfigError(
                f"{src} does not record its token ids (an mlx_lm.cache_prompt "
                "file): pass the prompt it was made from with -p"
            )
        conv = start(tokenizer, prompt)
        tokens = conv.tokens
        user.update(conv.metadata())
    lossless = args.budget_bits >= 16
    config = options.quant_config(args)
    if lossless:
        from ..formats import QuantConfig

        config = QuantConfig(widths=(16,), float_dtype="float32")
    card = prompt_cache_file_to_card(
        src,
        tokens=tokens,
        controller="uniform" if lossless else args.controller,
        budget_bits=32 if lossless else args.budget_bits,
        config=config,
        model_fingerprint=_fingerprint(model),
        user=user,
    )
    card.save(dst, key=options.card_key(args))
    print(
        f"wrote {dst}: {card.n_tokens} tokens, "
        f"{options.size_line(card, dst.stat().st_size)}",
        file=sys.stderr,
    )
    return 0
