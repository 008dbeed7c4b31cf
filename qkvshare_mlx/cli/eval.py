"""``qkvshare eval``: GSM8K agent chains, handoff fidelity by controller, budget, hops.

Protocol (see qkvshare_mlx/agents.py): the first ``--problems`` GSM8K test
problems; ``--shots`` train exemplars as few-shot chat turns; middle agents
solver -> checker -> calculator -> solver ... (``--middle-tokens`` greedy
tokens each) and an answerer asked for ``#### <number>`` (``--answer-tokens``).
A chain of h hops has h middle agents, then the answerer.

Per problem, in one process:

1. **Reference**: the ``exact`` chain (full-precision cache handed on in
   memory), real generation at every hop, the answerer branched after each
   hop count in ``--hops`` (the middle agents are shared).
2. **Teacher-forced grid** (cheap, no generation): for each controller and
   budget, cards are made hop by hop along the reference transcript, each
   inheriting the previous card's codes; the answerer's prompt and reply
   from the reference are fed through the card's cache and compared with
   the exact cache: KL(exact || card) and top-1 agreement of the next-token
   distributions. Every row also checks that the K/V of the tokens quantized
   at hop 1 are bit-identical in the last card.
3. **Generation** (first ``--gen-problems`` problems): ``--gen-controllers``
   at every budget, hops ``--gen-hops``, real generation at every hop:
   accuracy (numeric exact match), agreement of the final answer with the
   exact run, first generated token of the answerer that differs from the
   exact run's.

Controller names may carry a rotation (``saliency+hadamard``: cards quantized
after a Hadamard rotation, ``QuantConfig.rotation``).

Resumable: every result is appended to ``--state`` (JSON lines keyed by
kind, problem, mode, budget, hops); a rerun skips what is done. ``--report``
only aggregates the state into ``--json``, a markdown table beside it and
plots. ``bench/eval_gsm8k.py`` runs this with its outputs in bench/results/.

    qkvshare eval --model mlx-community/Qwen2.5-0.5B-Instruct-bf16 --problems 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from .. import agents as A
from .. import gsm8k
from ..errors import ConfigError
from ..models import load_model

mx = A.mx

DEFAULT_JSON = "qkvshare_eval.json"
CONTROLLERS = ["uniform", "sink-recent", "saliency", "topology"]
BUDGETS = [2.5, 3.0, 4.0, 4.5, 6.0]
HOPS = [1, 2, 4, 8]


# ----------------------------------------------------------------------------
# State file


_GZIP_CHUNK = 8192  # bytes fed to zlib at a time: bounds each member's unused_data


def _gzip_text(path: Path) -> str:
    """The text of a gzip file made of whole members (``cat a.gz b.gz`` or one
    member per append). A last member cut short by a kill is dropped from the
    file, so the next append starts on a member boundary; damage anywhere else
    is a ConfigError and the file is left as it is.

    Input goes to zlib in small chunks so that the bytes after a member's end
    (``unused_data``) stay small: feeding the whole rest of the file per member,
    as ``gzip.decompress`` does, is quadratic in the number of appended rows."""
    view = memoryview(path.read_bytes())
    parts, good = [], 0
    while good < len(view):
        d = zlib.decompressobj(wbits=31)
        member, pos = [], good
        while not d.eof and pos < len(view):
            try:
                member.append(d.decompress(view[pos : pos + _GZIP_CHUNK]))
            except zlib.error as e:
                raise ConfigError(f"state {path} is corrupt at byte {good}: {e}") from e
            pos = min(pos + _GZIP_CHUNK, len(view))
        if not d.eof:
            break
        parts += member
        good = pos - len(d.unused_data)
    if good < len(view):
        with open(path, "r+b") as f:
            f.truncate(good)
    return b"".join(parts).decode()


class State:
    """Append-only JSON lines keyed by (kind, problem, mode, budget, hops).

    A path ending in ``.gz`` is gzip: each ``add`` appends one member, so a
    state stays readable line by line and can be recompressed as one stream
    (``zcat s.gz | gzip -9 > t.gz``) to keep it small."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.gzip = self.path.suffix == ".gz"
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            text = _gzip_text(self.path) if self.gzip else self.path.read_text()
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: redo that result
                self.rows[self.key(row)] = row

    @staticmethod
    def key(row: dict) -> tuple:
        if row["kind"] == "meta":  # every command that wrote to this state
            return ("meta", row["problem"], row.get("command"), None, row["hops"])
        budget = row.get("budget_bits")
        return (
            row["kind"],
            row["problem"],
            row["mode"],
            None if budget is None else float(budget),
            row["hops"],
        )

    def __contains__(self, key) -> bool:
        return key in self.rows

    def get(self, key):
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row) + "\n"
        if self.gzip:
            with open(self.path, "ab") as f:
                f.write(gzip.compress(line.encode()))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        self.rows[self.key(row)] = row

    def of_kind(self, kind: str) -> list[dict]:
        return [r for k, r in self.rows.items() if k[0] == kind]


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = max(total, 1), 0, label
        self.t0 = time.perf_counter()

    def step(self, note: str = "") -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac else 0
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
            f"{el:6.0f}s eta {eta:6.0f}s {note[:40]:<40}"
        )
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------
# Reference chains, stored in the state


def ref_to_row(i: int, run: A.ChainRun, hops: int) -> dict:
    finals = {
        str(h): {k: f[k] for k in ("prompt", "reply", "text", "ttft_s")}
        for h, f in run.finals.items()
    }
    return {
        "kind": "ref",
        "problem": i,
        "mode": "exact",
        "budget_bits": None,
        "hops": hops,
        "tokens": run.tokens,
        "replies": run.replies,
        "finals": finals,
        "wall_s": run.wall_s,
    }


def row_to_ref(row: dict) -> A.ChainRun:
    run = A.ChainRun(tokens=row["tokens"], replies=[tuple(r) for r in row["replies"]])
    run.finals = {int(h): f for h, f in row["finals"].items()}
    run.wall_s = row["wall_s"]
    return run


def get_reference(state, ctx, i, problem) -> A.ChainRun:
    hops = max(ctx.hops)
    row = state.get(("ref", i, "exact", None, hops))
    if row is None:
        middle, answerer = ctx.agents(hops)
        run = A.run_chain(
            ctx.model,
            ctx.tokenizer,
            ctx.chat,
            problem["question"],
            middle,
            answerer,
            A.Handoff("exact"),
            finals=ctx.hops,
        )
        row = ref_to_row(i, run, hops)
        state.add(row)
    return row_to_ref(row)


# ----------------------------------------------------------------------------
# The phases


def teacher_forced(state, ctx, i, ref, progress) -> None:
    todo = [
        (c, b)
        for c in ctx.controllers
        for b in ctx.budgets
        if any(("tf", i, c, b, h) not in state for h in ctx.hops)
    ]
    if not todo:
        progress.done += len(ctx.controllers) * len(ctx.budgets) - 1
        progress.step()
        return
    pre = A.exact_prefill(ctx.model, ref.tokens, probe_until=ref.replies[0][1])
    ref_logits = {h: A.reference_logits(ctx.model, pre, ref, h) for h in ctx.hops}
    mx.eval(list(ref_logits.values()))
    for c in ctx.controllers:
        for b in ctx.budgets:
            if (c, b) not in todo:
                progress.step()
                continue
            handoff = A.Handoff.named(c, b)
            # topology plans for the chain's own length: one replay per depth
            topology = handoff.mode == "topology"
            groups = [(h,) for h in ctx.hops] if topology else [tuple(ctx.hops)]
            for finals in groups:
                res = A.replay_cards(
                    ctx.model, ctx.tokenizer, ref, handoff, finals, pre, ref_logits
                )
                for h, m in res.items():
                    state.add(
                        {
                            "kind": "tf",
                            "problem": i,
                            "mode": c,
                            "budget_bits": b,
                            "hops": h,
                            **m,
                        }
                    )
            progress.step(f"p{i} {c}@{b}")


def generated(state, ctx, i, problem, ref, progress) -> None:
    gold = problem["final"]
    for h in ctx.gen_hops:
        key = ("gen", i, "exact", None, h)
        if key not in state:
            text = ref.finals[h]["text"]
            pred = gsm8k.extract_answer(text)
            state.add(
                {
                    "kind": "gen",
                    "problem": i,
                    "mode": "exact",
                    "budget_bits": None,
                    "hops": h,
                    "answer": pred,
                    "correct": A.numeric_match(pred, gold),
                    "agreement": True,
                    "first_divergence": None,
                    "reply": ref.finals[h]["reply"],
                }
            )
    todo = [
        A.Handoff.named(c, b)
        for c in ctx.gen_controllers
        for b in ctx.budgets
        if not all(("gen", i, c, b, h) in state for h in ctx.gen_hops)
    ]
    if not todo:
        progress.step()
        return
    # one batch of lanes: an exact lane (batched decoding vs the unbatched
    # reference: the noise floor) and every configuration; topology plans
    # for each chain length, so it gets a batch per hop count
    plain = [A.Handoff("exact")] + [h for h in todo if h.mode != "topology"]
    groups = [(plain, tuple(ctx.gen_hops))]
    topo = [h for h in todo if h.mode == "topology"]
    groups += [(topo, (n,)) for n in ctx.gen_hops if topo]
    for handoffs, finals in groups:
        middle, answerer = ctx.agents(max(finals))
        runs = A.run_chains(
            ctx.model,
            ctx.tokenizer,
            ctx.chat,
            problem["question"],
            middle,
            answerer,
            handoffs,
            finals=finals,
            first_reply=ref.reply_ids(0),
        )
        for handoff, run in zip(handoffs, runs):
            for h in finals:
                f = run.finals[h]
                pred = gsm8k.extract_answer(f["text"])
                exact = gsm8k.extract_answer(ref.finals[h]["text"])
                card = run.hops[h - 1]
                mode = "exact-batched" if handoff.mode == "exact" else handoff.name
                state.add(
                    {
                        "kind": "gen",
                        "problem": i,
                        "mode": mode,
                        "budget_bits": handoff.budget_bits,
                        "hops": h,
                        "answer": pred,
                        "correct": A.numeric_match(pred, gold),
                        "agreement": pred == exact,
                        "first_divergence": A.first_divergence(
                            ref.finals[h]["reply"], f["reply"]
                        ),
                        "chain_identical": run.tokens[: ref.replies[h - 1][1]]
                        == ref.tokens[: ref.replies[h - 1][1]],
                        "effective_bits": card.get("effective_bits"),
                        "payload_bytes": card.get("payload_bytes"),
                        "ttft_s": f["ttft_s"],
                        "wall_s": run.wall_s,
                        "lanes": len(handoffs),
                    }
                )
    progress.step(f"p{i} gen x{len(todo)}")


# ----------------------------------------------------------------------------
# Report


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def complete(rows: list[dict], size: int) -> list[dict]:
    """Rows of the problems whose grid is complete (so every row averages
    the same problems; a run stopped midway leaves a partial problem out)."""
    count = {}
    for r in rows:
        count[r["problem"]] = count.get(r["problem"], 0) + 1
    return [r for r in rows if count[r["problem"]] >= size]


def _all(flags):
    """True/False over the flags that were checked; None if none was."""
    flags = [f for f in flags if f is not None]
    return all(flags) if flags else None


def aggregate(state, args) -> list[dict]:
    tf, gen = {}, {}
    tf_size = len(args.hops) * len(args.budgets) * len(args.controllers)
    gen_size = len(args.gen_hops) * (len(args.budgets) * len(args.gen_controllers) + 2)
    for r in complete(state.of_kind("tf"), tf_size):
        tf.setdefault((r["mode"], r["budget_bits"], r["hops"]), []).append(r)
    for r in complete(state.of_kind("gen"), gen_size):
        gen.setdefault((r["mode"], r["budget_bits"], r["hops"]), []).append(r)
    rows = []
    for key in sorted(set(tf) | set(gen), key=lambda k: (k[0], k[1] or 0, k[2])):
        mode, budget, hops = key
        t, g = tf.get(key, []), gen.get(key, [])
        divs = [r["first_divergence"] for r in g]
        row = {
            "controller": mode,
            "budget_bits": budget,
            "hops": hops,
            "effective_bits": _mean([r["effective_bits"] for r in t])
            or _mean([r.get("effective_bits") for r in g]),
            "kl": _mean([r["kl"] for r in t]),
            "top1_agreement": _mean([r["top1_agreement"] for r in t]),
            "card_bytes": _mean([r["payload_bytes"] for r in t])
            or _mean([r.get("payload_bytes") for r in g]),
            "fp16_bytes": _mean([r["fp16_bytes"] for r in t]),
            "card_tokens": _mean([r["tokens"] for r in t]),
            "hop1_bits_identical": _all([r["hop1_bits_identical"] for r in t]),
            "problems": len(t),
            "accuracy": _mean([float(r["correct"]) for r in g]),
            "agreement": _mean([float(r["agreement"]) for r in g]),
            "identical_answer_reply": _mean([float(d is None) for d in divs]),
            "first_divergence_mean": _mean([d for d in divs if d is not None]),
            "gen_problems": len(g),
            "replay_s": _mean([r["seconds"] for r in t]),
            "gen_wall_s": _mean([r.get("wall_s") for r in g]),
        }
        rows.append(row)
    return rows


def _fmt(x, f="{:.4f}"):
    return "-" if x is None else f.format(x)


def markdown(rows, meta) -> str:
    lines = [
        "# GSM8K agent chains: handoff fidelity",
        "",
        "Commands that produced the state: "
        + ", ".join(f"`{c}`" for c in meta["commands"])
        + "  ",
        f"Model: {meta['model']}, {meta['dtype']}, {meta['machine']}. "
        f"Teacher-forced metrics on {meta['tf_problems']} problems, generation "
        f"metrics on {meta['gen_problems']} problems (per-row counts below).",
        "",
        "| controller | budget | hops | eff. bits | KL | top-1 | acc. | agree | "
        "same reply | 1st div. | card KB | fp16 KB | hop-1 bits kept | n tf | n gen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['controller']} | {_fmt(r['budget_bits'], '{}')} | {r['hops']} | "
            f"{_fmt(r['effective_bits'], '{:.3f}')} | {_fmt(r['kl'])} | "
            f"{_fmt(r['top1_agreement'], '{:.3f}')} | "
            f"{_fmt(r['accuracy'], '{:.2f}')} | "
            f"{_fmt(r['agreement'], '{:.2f}')} | "
            f"{_fmt(r['identical_answer_reply'], '{:.2f}')} | "
            f"{_fmt(r['first_divergence_mean'], '{:.1f}')} | "
            f"{_fmt(r['card_bytes'] and r['card_bytes'] / 1024, '{:.0f}')} | "
            f"{_fmt(r['fp16_bytes'] and r['fp16_bytes'] / 1024, '{:.0f}')} | "
            f"{_fmt(r['hop1_bits_identical'], '{}')} | {r['problems']} | "
            f"{r['gen_problems']} |"
        )
    return "\n".join(lines + [""] + pivot(rows)) + "\n"


def pivot(rows) -> list[str]:
    """KL and top-1 per controller and budget, one column per hop count."""
    tf = {(r["controller"], r["budget_bits"], r["hops"]): r for r in rows if r["kl"]}
    hops = sorted({k[2] for k in tf})
    if not hops:
        return []
    lines = [
        "Teacher-forced KL (top-1) by hop count:",
        "",
        "| controller | budget | " + " | ".join(f"{h} hop(s)" for h in hops) + " |",
        "|---|---|" + "---|" * len(hops),
    ]
    for c, b in sorted({k[:2] for k in tf}, key=lambda k: (k[1], k[0])):
        cells = [
            f"{tf[c, b, h]['kl']:.4f} ({tf[c, b, h]['top1_agreement']:.3f})"
            if (c, b, h) in tf
            else "-"
            for h in hops
        ]
        lines.append(f"| {c} | {b} | " + " | ".join(cells) + " |")
    return lines


def _panels(plt, tf, ctrls, panel, x, title, xlabel, path, width, log_x=False):
    """One figure: a panel per value of ``panel``, KL vs ``x`` per controller."""
    values = sorted({r[panel] for r in tf})
    fig, axes = plt.subplots(
        1, len(values), figsize=(width * len(values), 4), sharey=True
    )
    axes = np.atleast_1d(axes)
    for ax, v in zip(axes, values):
        for c in ctrls:
            pts = sorted(
                (r[x], r["kl"]) for r in tf if r["controller"] == c and r[panel] == v
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title.format(v))
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("teacher-forced KL vs exact")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(rows, prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = [r for r in rows if r["kl"] is not None]
    if not tf:
        return []
    ctrls = sorted({r["controller"] for r in tf})
    paths = [
        _panels(
            plt,
            tf,
            ctrls,
            "hops",
            "effective_bits",
            "{} hop(s)",
            "effective bits",
            str(prefix) + "_bits.png",
            4,
        ),
        _panels(
            plt,
            tf,
            ctrls,
            "budget_bits",
            "hops",
            "budget {} bits",
            "hops",
            str(prefix) + "_hops.png",
            3.5,
            log_x=True,
        ),
    ]
    plt.close("all")
    return paths


def report(state, args, meta) -> dict:
    rows = aggregate(state, args)
    meta = dict(meta)
    # problems whose grid is complete (the rows average exactly these)
    meta["tf_problems"] = max([r["problems"] for r in rows] or [0])
    meta["gen_problems"] = max([r["gen_problems"] for r in rows] or [0])
    checked = [r["hop1_bits_identical"] for r in state.of_kind("tf")]
    meta["hop1_bits_identical_all"] = _all(checked)
    meta["hop1_bits_checks"] = sum(c is not None for c in checked)
    meta["commands"] = [r["command"] for r in state.of_kind("meta")]
    result = {**meta, "rows": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    if not args.quick:
        result["plots"] = plot(rows, out.with_suffix(""))
    return result


# ----------------------------------------------------------------------------


class Context:
    def __init__(self, args, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        shots = gsm8k.load_problems("train", args.shots) if args.shots else []
        self.chat = A.ChatFormat(
            tokenizer, [(p["question"], p["answer"]) for p in shots]
        )
        self.hops = sorted(args.hops)
        self.gen_hops = sorted(args.gen_hops)
        self.controllers, self.budgets = args.controllers, args.budgets
        self.gen_controllers = args.gen_controllers
        self.middle_tokens, self.answer_tokens = args.middle_tokens, args.answer_tokens

    def agents(self, hops):
        return A.gsm8k_agents(
            hops, middle_tokens=self.middle_tokens, answer_tokens=self.answer_tokens
        )


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ConfigError(f"--shard must be K/N with 0 <= K < N but got {text!r}")
    return k, n


def setup_arg_parser(default_json: str = DEFAULT_JSON) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare eval",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--model", default=None, help="model folder or hub id")
    p.add_argument("--problems", type=int, default=150)
    p.add_argument(
        "--gen-problems",
        type=int,
        default=None,
        help="problems with generation metrics (default: --problems)",
    )
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--hops", type=_list(int), default=HOPS)
    p.add_argument("--gen-hops", type=_list(int), default=[1, 4])
    p.add_argument("--controllers", type=_list(str), default=CONTROLLERS)
    p.add_argument("--budgets", type=_list(float), default=BUDGETS)
    p.add_argument(
        "--gen-controllers", type=_list(str), default=["uniform", "saliency"]
    )
    p.add_argument("--middle-tokens", type=int, default=48)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument(
        "--state",
        default=None,
        help="JSONL state, gzip if it ends in .gz (default: <json>.state.jsonl.gz)",
    )
    p.add_argument("--json", default=default_json, help="aggregated results")
    p.add_argument(
        "--shard",
        default="0/1",
        help="K/N: only problems i with i %% N == K (run N processes, one "
        "state file each, then concatenate the states and --report)",
    )
    p.add_argument("--quick", action="store_true", help="1 problem, tiny grid, < 60 s")
    p.add_argument("--report", action="store_true", help="only aggregate the state")
    return p


def run(args, command: str) -> dict:
    if args.quick:
        args.problems, args.gen_problems, args.shots = 1, 1, 1
        args.hops, args.gen_hops = [1, 2], [1]
        args.controllers, args.budgets = ["uniform", "saliency"], [3.0, 4.5]
        args.gen_controllers, args.middle_tokens, args.answer_tokens = (
            ["saliency"],
            12,
            12,
        )
        if not args.json_given:
            args.json = str(Path(args.json).with_suffix("")) + "_quick.json"
    gen_problems = args.problems if args.gen_problems is None else args.gen_problems
    if args.gen_hops and not set(args.gen_hops) <= set(args.hops):
        args.hops = sorted(set(args.hops) | set(args.gen_hops))
    state_path = args.state or str(Path(args.json).with_suffix(".state.jsonl.gz"))
    if args.quick:
        Path(state_path).unlink(missing_ok=True)
    state = State(state_path)
    meta = {
        "bench": "eval_gsm8k",
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "dtype": "float32",
        "machine": f"{platform.system()} {platform.machine()}",
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "shots": args.shots,
        "middle_tokens": args.middle_tokens,
        "answer_tokens": args.answer_tokens,
        "hops_grid": args.hops,
        "gen_hops": args.gen_hops,
        "gen_controllers": args.gen_controllers,
        "problems_requested": args.problems,
        "gen_problems_requested": gen_problems,
    }
    if not args.report:
        runs = state.of_kind("meta")
        state.add(
            {
                "kind": "meta",
                "problem": -1,
                "mode": "command",
                "budget_bits": None,
                "hops": len(runs),
                "command": command,
            }
        )
        model, tokenizer = load_model(args.model)
        ctx = Context(args, model, tokenizer)
        problems = gsm8k.load_problems("test", max(args.problems, gen_problems))
        # per problem: reference, teacher-forced grid, generation; so a run
        # stopped at any point leaves whole problems behind
        n = max(args.problems, gen_problems)
        per = len(ctx.controllers) * len(ctx.budgets) + 1
        prog = Progress(n * per, "problems")
        k, of = _shard(args.shard)
        for i in range(n):
            if i % of != k:
                prog.done += per
                continue
            ref = get_reference(state, ctx, i, problems[i])
            if i < args.problems:
                teacher_forced(state, ctx, i, ref, prog)
            else:
                prog.done += per - 1
            if i < gen_problems:
                generated(state, ctx, i, problems[i], ref, prog)
            else:
                prog.step()
    return report(state, args, meta)


def main(
    argv: list[str] | None = None,
    *,
    default_json: str = DEFAULT_JSON,
    prog: str = "qkvshare eval",
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = setup_arg_parser(default_json).parse_args(argv)
    args.json_given = any(a == "--json" or a.startswith("--json=") for a in argv)
    result = run(args, " ".join([prog, *argv]))
    print(Path(args.json).with_suffix(".md").read_text())
    print(
        "hop-1 codes bit-identical in every later card: "
        f"{result['hop1_bits_identical_all']}"
    )
    return 0
