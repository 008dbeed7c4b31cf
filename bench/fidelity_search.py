"""Fidelity search: card settings and the literature's baselines, on the same
contexts and metrics.

Every candidate is scored teacher-forced against the exact cache of the
same model, in the same process: mean KL(exact || candidate) of the
next-token distributions and their top-1 agreement.

1. GSM8K chains, hop 1: the first ``--problems`` reference chains of the
   committed study (``bench/results/eval_gsm8k.state.jsonl.gz``, made by
   ``bench/eval_gsm8k.py``): the planner's context becomes a card and the
   answerer's reference prompt and reply are fed through it.
2. Long transcripts (``--contexts``; the TTFT bench's multi-agent text): a
   card of the first N tokens, the next ``--follow`` tokens fed through it.

Candidates: this library's cards (controller, budget, quantizer settings)
and three baselines, each at its true effective bits:

- mlx-lm's own ``QuantizedKVCache`` (``--kv-bits`` 4 and 8, group 64): its
  scales and biases are stored in the cache dtype, float32 here (so 4-bit
  is 5.0 effective bits here and 4.5 on a float16 Mac);
- KIVI: keys per channel and values per token, groups of 32, 4 or 2 bits,
  with the 128 most recent tokens kept in float16 (its residual window);
- uniform per-token groups (the format of ``mx.quantize``).

Rows go to a resumable state file as they finish (``--state``); a rerun
skips them. Prints a table, writes JSON, markdown and a plot of top-1
against effective bits for every method.

    python bench/fidelity_search.py --problems 150 --contexts 1024,4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from report import environment, write_reports  # noqa: E402  (bench/report.py)

from qkvshare_mlx.quant.controllers import TokenStats  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STUDY_STATE = RESULTS / "eval_gsm8k.state.jsonl.gz"
KIVI_WINDOW = 128


@dataclass(frozen=True)
class Candidate:
    """One row of the tables: ``kind`` "card" (``controller``, ``budget``
    and ``QuantConfig`` keywords ``config``), "mlx-lm" (its
    ``QuantizedKVCache`` at ``bits``), "kivi" (at ``bits``), "pre-rope"
    (a card of the keys before RoPE, decoded and RoPE'd again), or the
    ablations "keys-only" / "values-only" (a card whose other half is
    replaced by the exact K or V; its bits are the card's)."""

    name: str
    kind: str = "card"
    controller: str = "saliency"
    budget: float | None = None
    config: dict = field(default_factory=dict)
    bits: int | None = None


H = {"rotation": "hadamard"}
SPLIT = {"rotation": "hadamard", "split_kv": True}
W3 = (3, 4, 5, 6, 8, 16)  # the code widths without 2 bits
CANDIDATES = [
    Candidate("mlx-lm kv-bits 4", kind="mlx-lm", bits=4),
    Candidate("mlx-lm kv-bits 8", kind="mlx-lm", bits=8),
    Candidate("KIVI-4", kind="kivi", bits=4),
    Candidate("KIVI-2", kind="kivi", bits=2),
    Candidate(
        "uniform per-token @4.5", "card", "uniform", 4.5, {"key_layout": "token"}
    ),
    Candidate("uniform @3.0", "card", "uniform", 3.0),
    Candidate("uniform @4.5", "card", "uniform", 4.5),
    Candidate("saliency+hadamard @3.0", budget=3.0, config=H),
    Candidate("saliency+hadamard @4.5", budget=4.5, config=H),
    Candidate("saliency+hadamard @5.0", budget=5.0, config=H),
    Candidate("saliency+hadamard @5.5", budget=5.5, config=H),
    Candidate("saliency+hadamard @6.0", budget=6.0, config=H),
    Candidate("saliency+hadamard+split @3.0", budget=3.0, config=SPLIT),
    Candidate("saliency+hadamard+split @4.5", budget=4.5, config=SPLIT),
    Candidate("saliency+hadamard+split @5.0", budget=5.0, config=SPLIT),
    Candidate("saliency+hadamard+split @5.5", budget=5.5, config=SPLIT),
    Candidate("saliency+hadamard+split @6.0", budget=6.0, config=SPLIT),
    # ablations: which half of a 4.5-bit card carries the error
    Candidate("ablation: only keys quantized", "keys-only", budget=4.5, config=H),
    Candidate("ablation: only values quantized", "values-only", budget=4.5, config=H),
    Candidate(
        "saliency+hadamard+split, per-token keys @4.5",
        budget=4.5,
        config={**SPLIT, "key_layout": "token"},
    ),
    # attention sinks and the newest tokens pinned in float16, in the budget
    Candidate(
        "saliency+hadamard+split, 4 sinks + 32 recent pinned @4.5",
        budget=4.5,
        config={**SPLIT, "pin_sinks": 4, "pin_recent": 32},
    ),
    # (32 recent tokens in float leave too few bits for the rest at 3.0 bits
    # on the ~360-token GSM8K contexts)
    Candidate(
        "saliency+hadamard+split, 4 sinks + 8 recent pinned @3.0",
        budget=3.0,
        config={**SPLIT, "pin_sinks": 4, "pin_recent": 8},
    ),
    # key errors weighed by the probe queries' energy per channel (the
    # logits' error, not the key vectors'; QuantConfig.key_error)
    *(
        Candidate(
            f"saliency+hadamard+split, query-aware keys @{b}",
            budget=b,
            config={**SPLIT, "key_error": "query"},
        )
        for b in (3.0, 4.5)
    ),
    # keys quantized before RoPE (KVQuant), simulated: RoPE undone on the
    # sender's keys through the model's own RoPE matrices, quantized, decoded
    # and RoPE'd again (measured before the card format had it; kept to
    # compare with the format's rows below)
    *(
        Candidate(
            f"saliency+hadamard+split, pre-RoPE keys @{b}",
            "pre-rope",
            budget=b,
            config=SPLIT,
        )
        for b in (3.0, 4.5)
    ),
    Candidate(
        "saliency+split, pre-RoPE keys @4.5",
        "pre-rope",
        budget=4.5,
        config={"split_kv": True},
    ),
    # the same as a card: QuantConfig.key_rope (format version 4), read from
    # the model, decoded by the receiver's own fast path
    *(
        Candidate(
            f"saliency+hadamard+split, pre-RoPE card @{b}",
            budget=b,
            config={**SPLIT, "pre_rope": True},
        )
        for b in (3.0, 4.5, 5.0, 5.5)
    ),
    # above 5.5 bits the split no longer helps (the 6.0 rows): unsplit
    Candidate(
        "saliency+hadamard, pre-RoPE card @6.0",
        budget=6.0,
        config={**H, "pre_rope": True},
    ),
    Candidate(
        "saliency+split, pre-RoPE card @4.5",
        budget=4.5,
        config={"split_kv": True, "pre_rope": True},
    ),
    # no token below 3 (or 4) bits at the best setting: where the error
    # model and top-1 disagree about the least-attended tokens (the group
    # sizes need no rows: adaptive_groups already picks 32, 64 or 128 per
    # token)
    *(
        Candidate(
            f"saliency+hadamard+split, pre-RoPE card, widths {what} @4.5",
            budget=4.5,
            config={**SPLIT, "pre_rope": True, "widths": widths},
        )
        for what, widths in (("3-8", W3), ("4-8", (4, 5, 6, 8, 16)))
    ),
    *(
        Candidate(
            f"saliency+hadamard+split, pre-RoPE card, widths 3-8 @{b}",
            budget=b,
            config={**SPLIT, "pre_rope": True, "widths": W3},
        )
        for b in (5.0, 5.5)
    ),
    Candidate(
        "saliency+hadamard, pre-RoPE card, widths 3-8 @6.0",
        budget=6.0,
        config={**H, "pre_rope": True, "widths": W3},
    ),
    # each layer's key and value errors weighed by the model's measured
    # sensitivity (bench/sensitivity.py, on train problems; KVTuner)
    *(
        Candidate(
            f"saliency+hadamard+split, pre-RoPE card, widths 3-8, layer-weighted @{b}",
            budget=b,
            config={**SPLIT, "pre_rope": True, "widths": W3, "layer_weights": True},
        )
        for b in (4.5, 5.0, 5.5)
    ),
    Candidate(
        "saliency+hadamard+split, pre-RoPE card, layer-weighted @3.0",
        budget=3.0,
        config={**SPLIT, "pre_rope": True, "layer_weights": True},
    ),
    Candidate(
        "saliency+hadamard, layer-weighted @6.0",
        budget=6.0,
        config={**H, "layer_weights": True},
    ),
    # ... and unrotated, where the keys' outlier channels are left in place
    Candidate("saliency+split @4.5", budget=4.5, config={"split_kv": True}),
    Candidate(
        "saliency+split, query-aware keys @4.5",
        budget=4.5,
        config={"split_kv": True, "key_error": "query"},
    ),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# A candidate's cache of the first T tokens of exact (B, H, T, D) K/V


def _kv_caches(keys, values):
    from mlx_lm.models.cache import KVCache

    out = []
    for k, v in zip(keys, values):
        c = KVCache()
        c.state = (k, v, k.shape[2])
        out.append(c)
    return out


def rope_matrices(attn, T: int, D: int) -> mx.array:
    """(T, D, D) matrices of the attention's RoPE at positions 0..T-1 for
    head size D: column j of matrix t is ``attn.rope`` of the unit vector
    e_j at t (any RoPE variant is a rotation per position, so one call on D
    "heads" of unit vectors reads them all)."""
    eye = mx.broadcast_to(mx.eye(D)[None, :, None, :], (1, D, T, D))
    return attn.rope(eye, offset=0)[0].transpose(1, 2, 0)  # (T, i, j)


def rope_keys(rope: mx.array, k: mx.array, *, inverse: bool) -> mx.array:
    """(B, H, T, D) keys through RoPE (``inverse``: RoPE undone, R_t^T k_t)."""
    spec = "tji,bhtj->bhti" if inverse else "tij,bhtj->bhti"
    return mx.einsum(spec, rope.astype(mx.float32), k.astype(mx.float32))


def candidate_cache(model, cand: Candidate, keys, values, stats, *, sensitivity=None):
    """(mlx-lm cache list, effective bits, payload bytes) of one candidate;
    ``sensitivity``: the LayerSensitivity of the layer-weighted candidates."""
    from mlx_lm.models.cache import KVCache

    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.inject import inject
    from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
    from qkvshare_mlx.rope import from_mlx_model

    B, Hk, T, Dk = keys[0].shape
    n_el = len(keys) * B * Hk * T * (Dk + values[0].shape[3])
    if cand.kind == "mlx-lm":
        caches = []
        for k, v in zip(keys, values):
            c = KVCache()
            c.state = (k, v, T)
            caches.append(c.to_quantized(group_size=64, bits=cand.bits))
        payload = sum(
            sum(a[..., :T, :].nbytes for a in t)
            for q in caches
            for t in (q.keys, q.values)
        )
        return caches, 8 * payload / n_el, payload
    if cand.kind == "kivi":
        n_q = max(T - KIVI_WINDOW, 0) // 32 * 32  # whole key groups quantized
        cfg = QuantConfig(
            key_layout="channel",
            key_group=32,
            group_size=32,
            adaptive_groups=False,
            widths=(cand.bits,),
        )
        if n_q == 0:
            return _kv_caches(keys, values), 16.0, n_el * 2
        qkv = quantize_cache(
            [k[..., :n_q, :] for k in keys],
            [v[..., :n_q, :] for v in values],
            controller="uniform",
            budget_bits=cand.bits + 1.0,  # b-bit codes, fp16 scales of 32
            config=cfg,
        )
        qk, qv = dequantize_cache(qkv)
        ks = [mx.concatenate([a, k[..., n_q:, :]], axis=2) for a, k in zip(qk, keys)]
        vs = [mx.concatenate([a, v[..., n_q:, :]], axis=2) for a, v in zip(qv, values)]
        tail = len(keys) * B * Hk * (T - n_q) * (Dk + values[0].shape[3])
        payload = qkv.payload_bytes + 2 * tail  # the window in float16
        return _kv_caches(ks, vs), 8 * payload / n_el, payload
    if cand.kind == "pre-rope":  # quantize the keys before RoPE (KVQuant)
        ropes = [rope_matrices(layer.self_attn, T, Dk) for layer in model.layers]
        keys = [rope_keys(m, k, inverse=True) for m, k in zip(ropes, keys)]
    config = dict(cand.config)
    if config.pop("pre_rope", False):
        config["key_rope"] = from_mlx_model(model)
    if config.pop("layer_weights", False):
        if sensitivity is None:
            raise SystemExit(f"{cand.name}: needs a --sensitivity profile")
        weights = sensitivity.layer_weights(len(keys))
        stats = dataclasses.replace(stats, layer_weights=weights)
    qkv = quantize_cache(
        keys,
        values,
        controller=cand.controller,
        budget_bits=cand.budget,
        config=QuantConfig(**config),
        stats=stats,
    )
    if cand.kind == "pre-rope":
        qk, qv = dequantize_cache(qkv)
        ks = [rope_keys(m, k, inverse=False) for m, k in zip(ropes, qk)]
        return _kv_caches(ks, qv), qkv.effective_bits, qkv.payload_bytes
    if cand.kind in ("keys-only", "values-only"):
        qk, qv = dequantize_cache(qkv)
        ks, vs = (qk, values) if cand.kind == "keys-only" else (keys, qv)
        return _kv_caches(ks, vs), qkv.effective_bits, qkv.payload_bytes
    return inject(qkv, model), qkv.effective_bits, qkv.payload_bytes


def candidate_logits(
    model, cand, keys, values, stats, feed, first, *, sensitivity=None
):
    """(logits of ``feed`` from position ``first`` on through the
    candidate's cache, effective bits, payload bytes)."""
    cache, bits, payload = candidate_cache(
        model, cand, keys, values, stats, sensitivity=sensitivity
    )
    got = model(mx.array(feed)[None], cache=cache)[0].astype(mx.float32)[first:]
    return got, bits, payload


def score(
    model, cand, keys, values, stats, feed, ref_logits, first, *, sensitivity=None
):
    """Metrics of one candidate: feed ``feed`` through its cache; the
    logits from position ``first`` on are compared with ``ref_logits``."""
    from qkvshare_mlx.evals.metrics import compare_logits

    tic = time.perf_counter()
    got, bits, payload = candidate_logits(
        model, cand, keys, values, stats, feed, first, sensitivity=sensitivity
    )
    return {
        **compare_logits(ref_logits, got),
        "effective_bits": round(float(bits), 4),
        "payload_bytes": int(payload),
        "seconds": round(time.perf_counter() - tic, 3),
    }


# ----------------------------------------------------------------------------
# The two kinds of context


@dataclass
class Hop1:
    """One GSM8K chain at hop 1: the planner's exact (B, H, T, D) K/V of its
    ``end`` context tokens and their statistics, the answerer's tokens fed
    through a candidate's cache (``feed``), and the exact logits from
    position ``first`` of it on."""

    problem: int
    end: int
    keys: list
    values: list
    stats: TokenStats
    feed: list
    ref_logits: mx.array
    first: int


def gsm8k_contexts(model, tokenizer, n_problems, skip=lambda problem: False):
    """Yield a :class:`Hop1` for each of the first ``n_problems`` reference
    chains of the committed study (those ``skip`` does not skip)."""
    from qkvshare_mlx.evals.phases import row_to_ref
    from qkvshare_mlx.evals.replay import exact_prefill, reference_logits
    from qkvshare_mlx.evals.state import State

    study = State(STUDY_STATE)
    refs = sorted(study.of_kind("ref"), key=lambda r: r["problem"])[:n_problems]
    if len(refs) < n_problems:
        raise SystemExit(f"{STUDY_STATE} has {len(refs)} reference chains")
    retokenize = _study_retokenizer(tokenizer)
    for row in refs:
        if skip(row["problem"]):
            continue
        ref = retokenize(row_to_ref(row))
        end = ref.replies[0][1]
        pre = exact_prefill(model, ref.tokens, probe_until=end)
        ref_logits = reference_logits(model, pre, ref, 1)
        final = ref.finals[1]
        feed = final["prompt"][end:] + final["reply"]
        first = len(final["prompt"]) - end - 1
        keys = [k[..., :end, :] for k in pre.keys]
        values = [v[..., :end, :] for v in pre.values]
        yield Hop1(
            row["problem"], end, keys, values, pre.stats, feed, ref_logits, first
        )


def gsm8k_rows(model, tokenizer, state, n_problems, cands, *, sensitivity=None):
    def todo(i):
        return [c for c in cands if ("gsm8k", i, c.name) not in state]

    for h in gsm8k_contexts(model, tokenizer, n_problems, lambda i: not todo(i)):
        cs = todo(h.problem)
        for c in cs:
            m = score(model, c, h.keys, h.values, h.stats, h.feed, h.ref_logits,
                      h.first, sensitivity=sensitivity)  # fmt: skip
            row = {"set": "gsm8k", "item": h.problem, "name": c.name, "tokens": h.end}
            state.add({**row, **m})
        log(f"gsm8k problem {h.problem}: {len(cs)} candidates")


def _study_retokenizer(tokenizer):
    """A function mapping the study's chains (token ids of the default model)
    onto ``tokenizer``'s ids: identity for the default model's tokenizer;
    otherwise the hop-1 context, the answerer's prompt suffix and its reply
    are decoded to text and re-encoded, so another model reads the same
    text with the same boundaries (the chat markup stays as plain text)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from qkvshare_mlx.models import resolve_model

    study = load_tokenizer(Path(resolve_model(None)))
    if study.vocab_size == tokenizer.vocab_size and study.encode(
        "Natalia sold clips"
    ) == tokenizer.encode("Natalia sold clips"):
        return lambda ref: ref

    def encode(text, first):
        ids = tokenizer.encode(text, add_special_tokens=first)
        return list(ids)

    def retokenize(ref):
        from qkvshare_mlx.agents import ChainRun

        end = ref.replies[0][1]
        final = ref.finals[1]
        context = encode(study.decode(ref.tokens[:end]), True)
        prompt = context + encode(study.decode(final["prompt"][end:]), False)
        reply = encode(study.decode(final["reply"]), False)
        out = ChainRun(tokens=context, replies=[(0, len(context))])
        out.finals = {1: {**final, "prompt": prompt, "reply": reply}}
        return out

    return retokenize


def transcript_rows(
    model, tokenizer, state, contexts, follow, cands, *, sensitivity=None
):
    from transcript import transcript_tokens  # bench/transcript.py

    from qkvshare_mlx.capture import prefill

    for n in contexts:
        todo = [c for c in cands if ("transcript", n, c.name) not in state]
        if not todo:
            continue
        ids = transcript_tokens(tokenizer, n + follow)
        pre = prefill(model, ids[:n], probe_queries=32)
        exact = _kv_caches(pre.keys, pre.values)
        ref = model(mx.array(ids[n:])[None], cache=exact)[0].astype(mx.float32)
        mx.eval(ref)
        for c in todo:
            m = score(model, c, pre.keys, pre.values, pre.stats, ids[n:], ref, 0,
                      sensitivity=sensitivity)  # fmt: skip
            state.add({"set": "transcript", "item": n, "name": c.name, **m})
            log(
                f"transcript {n}: {c.name} KL {m['kl']:.5f} "
                f"top-1 {m['top1_agreement']:.3f}"
            )


# ----------------------------------------------------------------------------
# State, tables, plot


class RowState:
    """Rows (JSON lines) keyed by (set, item, name); appended as they finish."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[(r["set"], r["item"], r["name"])] = r

    def __contains__(self, key):
        return key in self.rows

    def add(self, row):
        self.rows[(row["set"], row["item"], row["name"])] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def aggregate(state, cands) -> list[dict]:
    out = []
    for s in ("gsm8k", "transcript"):  # (rows of set "command" are the runs)
        items = sorted({k[1] for k in state.rows if k[0] == s})
        groups = [("all", items)] if s == "gsm8k" else [(n, [n]) for n in items]
        for label, its in groups:
            for c in cands:
                rs = [
                    state.rows[(s, i, c.name)] for i in its if (s, i, c.name) in state
                ]
                if not rs:
                    continue
                out.append(
                    {
                        "set": s,
                        "context": label,
                        "name": c.name,
                        "n": len(rs),
                        **{
                            k: float(np.mean([r[k] for r in rs]))
                            for k in ("effective_bits", "kl", "top1_agreement")
                        },
                        "payload_bytes": float(
                            np.mean([r["payload_bytes"] for r in rs])
                        ),
                    }
                )
    return out


def markdown(rows) -> str:
    lines = [
        "| set | context | method | n | eff. bits | KL | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['context']} | {r['name']} | {r['n']} | "
            f"{r['effective_bits']:.3f} | {r['kl']:.5f} | {r['top1_agreement']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({(r["set"], str(r["context"])) for r in rows})
    fig, axes = plt.subplots(
        1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False
    )
    for ax, (s, ctx) in zip(axes[0], sets):
        for r in (r for r in rows if r["set"] == s and str(r["context"]) == ctx):
            ax.scatter(r["effective_bits"], r["top1_agreement"], s=18)
            ax.annotate(
                r["name"], (r["effective_bits"], r["top1_agreement"]), fontsize=6
            )
        ax.set_xlabel("effective bits per K/V element (scales included)")
        ax.set_ylabel("teacher-forced top-1")
        ax.set_title(f"{s} {ctx}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--state``, ``--report`` and ``--sensitivity`` (also bench/near_ties.py's)."""
    p.add_argument("--state", type=Path, default=None)
    p.add_argument(
        "--report", action="store_true", help="only rebuild the reports from the state"
    )
    p.add_argument(
        "--sensitivity",
        type=Path,
        default=RESULTS / "sensitivity.json",
        help="layer sensitivity profile of the model (bench/sensitivity.py), "
        "for the layer-weighted candidates",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--problems", type=int, default=150)
    p.add_argument("--contexts", default="1024,4096", help="'' for none")
    p.add_argument("--follow", type=int, default=64)
    p.add_argument(
        "--only", default=None, help="candidate names, separated by ',' (or ';')"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity_search.json")
    add_run_options(p)
    args = p.parse_args(argv)

    from qkvshare_mlx.models import load_model
    from qkvshare_mlx.sensitivity import LayerSensitivity

    cands = CANDIDATES
    if args.only:
        # names with a comma in them are listed with ";" between names (or
        # alone)
        names = {c.name for c in CANDIDATES}
        sep = ";" if ";" in args.only or args.only in names else ","
        wanted = set(args.only.split(sep))
        unknown = sorted(wanted - names)
        if unknown:
            p.error(f"--only: unknown candidates {unknown}")
        cands = [c for c in CANDIDATES if c.name in wanted]
    sensitivity = None
    if any(c.config.get("layer_weights") for c in cands) and not args.report:
        sensitivity = LayerSensitivity.load(args.sensitivity)
    state = RowState(args.state or args.out.with_suffix(".state.jsonl"))
    tic = time.perf_counter()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    command = shlex.join(
        ["python", "bench/fidelity_search.py", *(argv or sys.argv[1:])]
    )
    if not args.report:  # the runs behind the state, in order
        n = sum(1 for k in state.rows if k[0] == "command")
        state.add({"set": "command", "item": n, "name": command})
        model, tokenizer = load_model(args.model)
        if args.problems:
            gsm8k_rows(
                model, tokenizer, state, args.problems, cands, sensitivity=sensitivity
            )
        transcript_rows(
            model, tokenizer, state, contexts, args.follow, cands,
            sensitivity=sensitivity,
        )  # fmt: skip
    rows = aggregate(state, CANDIDATES)  # every row of the state, not only --only's
    table = markdown(rows)
    print(table)
    result = {
        "bench": "fidelity_search",
        "command": command,
        "commands": [
            r["name"] for k, r in sorted(state.rows.items()) if k[0] == "command"
        ],
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "problems": args.problems,
        "contexts": contexts,
        "follow_tokens": args.follow,
        "note": "hop 1, teacher-forced against the exact cache; mlx-lm rows count "
        "their scales in the cache dtype (float32 here)",
        **environment(),
        "elapsed_s": round(time.perf_counter() - tic, 1),
        "rows": rows,
    }
    runs = "\n".join(f"- `{c}`" for c in result["commands"])
    write_reports(args.out, result, f"runs behind this table:\n\n{runs}\n\n" + table)
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
