"""``qkvshare inspect CARD``: what a card holds, what it costs, whether it is intact.

Loading the card verifies it (structure, then checksum); a card that fails
is an error (one line, exit 2). :func:`summarize` returns the figures as a
dict; the CLI prints them as text or JSON. A tokenizer, when one is at hand
(``--model``, or the default model if it was already converted), decodes a
preview of the cached tokens; this command never converts or downloads one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..card import CacheCard
from ..errors import ModelMismatchError
from ..fingerprint import fingerprint_from_config, mismatches
from . import options

PREVIEW_TOKENS = 48


def summarize(
    card: CacheCard, *, file_bytes: int | None = None, tokenizer=None
) -> dict:
    """The figures ``qkvshare inspect`` reports for a verified card.

    Args:
        card: a loaded (hence verified) card.
        file_bytes: the card file's size; defaults to the serialised size.
        tokenizer: optional tokenizer with ``decode`` for a token preview.

    Returns:
        A JSON-serialisable dict: model, producer, cache, tokens, quant,
        widths, bytes, compression, checksum and user metadata.
    """
    if file_bytes is None:
        file_bytes = len(card.to_bytes())
    ids = [int(t) for t in card.tokens]
    tokens = {"count": len(ids), "first_ids": ids[:PREVIEW_TOKENS]}
    if tokenizer is not None and ids:
        tokens["preview"] = tokenizer.decode(ids[:PREVIEW_TOKENS])
    n_segments = sum(len(layer) for layer in card.layers)
    widths = card.width_histogram()
    total = max(sum(widths.values()), 1)
    quant = card.quant
    return {
        "format_version": card.version,
        "model": card.model,
        "producer": card.producer,
        "cache": card.cache,
        "tokens": tokens,
        "layers": {"count": len(card.layers), "segments": n_segments},
        "quant": {
            "controller": quant.get("controller"),
            "budget_bits": quant.get("budget_bits"),
            "effective_bits": card.effective_bits,
            "nominal_bits": quant.get("nominal_bits"),
            "config": quant.get("config"),
        },
        "widths": {
            str(b): {"tokens": n, "share": n / total} for b, n in widths.items()
        },
        "bytes": {
            "file": file_bytes,
            "payload": card.payload_bytes,
            "overhead": file_bytes - card.payload_bytes,
            "fp16": card.fp16_bytes,
        },
        "compression_vs_fp16": card.fp16_bytes / max(file_bytes, 1),
        "checksum": {"status": "verified", "sha256": card.checksum()},
        "user": card.user,
    }


def _default_tokenizer_dir() -> Path | None:
    """The default model's folder if it was already converted (never converts)."""
    try:
        from qkvshare_converters import gguf_model
    except ImportError:
        return None
    folder = gguf_model.default_hf_dir()
    return folder if (folder / "config.json").is_file() else None


def _load_tokenizer(model: str | None, card: CacheCard):
    """(tokenizer, config) of ``--model``, or of the default model when it is
    already converted and its config matches the card's fingerprint."""
    from ..models import check_model_folder, model_config

    if model:
        folder = Path(model).expanduser()
        check_model_folder(folder)
    else:
        folder = _default_tokenizer_dir()
        if folder is None:
            return None, None
        # Decoding with another model's tokenizer would print nonsense.
        fp = fingerprint_from_config(model_config(folder))
        if mismatches(card.model, fp):
            return None, None
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    try:
        return load_tokenizer(folder), model_config(folder)
    except Exception:
        if model:  # asked for explicitly: a broken folder is an error
            raise
        return None, None


def _format_text(s: dict, model_check: list[str] | None) -> str:
    m, c, q, b = s["model"], s["cache"], s["quant"], s["bytes"]
    lines = [
        f"model      {m.get('model_type')}  layers={m.get('n_layers')} "
        f"kv_heads={m.get('n_kv_heads')} head_dim={m.get('head_dim')} "
        f"vocab={m.get('vocab_size')} rope_theta={m.get('rope_theta')}",
        f"producer   {s['producer'].get('library')} {s['producer'].get('version')} "
        f"({s['producer'].get('runtime')})",
        f"cache      {c['n_layers']} layers x batch {c['batch']} x "
        f"{c['n_kv_heads']} heads x {c['n_tokens']} tokens x "
        f"(K {c['head_dim_k']}, V {c['head_dim_v']}), "
        f"offset {c['offset']}, {c['dtype']}",
        f"tokens     {s['tokens']['count']}",
    ]
    if "preview" in s["tokens"]:
        lines.append(f"preview    {s['tokens']['preview']!r}")
    held = c.get("held_from")
    if held:
        lo, hi = min(h for h in held if h), max(held)
        where = f"{lo}" if lo == hi else f"{lo}-{hi}"
        lines.append(
            f"windows    {sum(1 for h in held if h)} of {len(held)} layers hold "
            f"only their window (from position {where})"
        )
    lines += [
        f"segments   {s['layers']['segments']} in {s['layers']['count']} layers",
        f"controller {q['controller']}  budget {q['budget_bits']}  "
        f"rotation {(q['config'] or {}).get('rotation', 'none')}  "
        f"(format v{s['format_version']})",
        f"bits       effective {q['effective_bits']:.3f}  nominal {q['nominal_bits']}",
        "widths     "
        + "  ".join(
            f"{'f' if k == '16' else ''}{k}b: {v['share']:.1%}"
            for k, v in s["widths"].items()
        ),
        f"bytes      file {b['file']:,}  payload {b['payload']:,}  "
        f"overhead {b['overhead']:,}  (fp16 cache {b['fp16']:,})",
        f"compression {s['compression_vs_fp16']:.2f}x vs fp16",
        f"checksum   {s['checksum']['status']} ({s['checksum']['sha256'][:16]}...)",
    ]
    if model_check is not None:
        lines.append(
            "model check " + ("matches" if not model_check else "; ".join(model_check))
        )
    if s["user"]:
        lines.append(f"user       {json.dumps(s['user'], sort_keys=True)}")
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkvshare inspect",
        description="Print a CacheCard's model, sizes, widths and checksum status.",
    )
    parser.add_argument("card", help="the CacheCard file (.safetensors)")
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of text"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a model folder whose tokenizer decodes a token preview; the card's "
        "fingerprint is also compared with it (default: the default model's "
        "tokenizer, if already converted)",
    )
    options.add_security(parser, receiver=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    path = Path(args.card)
    card = CacheCard.load(
        path, key=options.card_key(args)
    )  # verifies; CardError -> exit 2
    tokenizer, config = _load_tokenizer(args.model, card)
    summary = summarize(card, file_bytes=path.stat().st_size, tokenizer=tokenizer)
    model_check = None
    if args.model and config is not None:
        model_check = mismatches(card.model, fingerprint_from_config(config, tokenizer))
        summary["model_check"] = model_check
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(_format_text(summary, model_check))
    if model_check:
        raise ModelMismatchError(
            f"{path} was made for another model than {args.model}: "
            + "; ".join(model_check)
        )
    return 0
