"""The study's phases for one problem, each writing its rows to the state.

1. :func:`get_reference`: the exact chain (real generation, the answerer
   branched after every hop count);
2. :func:`teacher_forced`: every controller and budget replayed along it;
3. :func:`generated`: the generation controllers, all lanes of a problem
   decoded as one batch.

``ctx`` carries the model, chat format and grid (``run.Context``); the
phases skip every key already in the state, so a rerun resumes. The module
knows the grid and the rows' fields, not how rows are aggregated
(``report``) nor where the options come from.
"""

from __future__ import annotations

import mlx.core as mx

from ..agents import ChainRun, Handoff, run_chain
from .gsm8k import extract_answer, numeric_match
from .lanes import run_chains
from .metrics import first_divergence
from .replay import exact_prefill, reference_logits, replay_cards


def ref_to_row(i: int, run: ChainRun, hops: int) -> dict:
    """The state row of problem ``i``'s reference chain of ``hops`` hops."""
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


def row_to_ref(row: dict) -> ChainRun:
    """The reference chain back from its state row (:func:`ref_to_row`)."""
    run = ChainRun(tokens=row["tokens"], replies=[tuple(r) for r in row["replies"]])
    run.finals = {int(h): f for h, f in row["finals"].items()}
    run.wall_s = row["wall_s"]
    return run


def get_reference(state, ctx, i, problem) -> ChainRun:
    """Phase 1: problem ``i``'s exact chain, from the state or run and stored.

    The answerer is branched after every hop count in ``ctx.hops``.
    """
    hops = max(ctx.hops)
    row = state.get(("ref", i, "exact", None, hops))
    if row is None:
        middle, answerer = ctx.agents(hops)
        run = run_chain(
            ctx.model,
            ctx.tokenizer,
            ctx.chat,
            problem["question"],
            middle,
            answerer,
            Handoff("exact"),
            finals=ctx.hops,
        )
        row = ref_to_row(i, run, hops)
        state.add(row)
    return row_to_ref(row)


def teacher_forced(state, ctx, i, ref, progress) -> None:
    """Phase 2: the teacher-forced grid of problem ``i`` along ``ref``.

    One ``tf`` row per controller, budget and hop count not yet in the state
    (``replay.replay_cards``); ``progress`` steps once per (controller,
    budget).
    """
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
    pre = exact_prefill(ctx.model, ref.tokens, probe_until=ref.replies[0][1])
    ref_logits = {h: reference_logits(ctx.model, pre, ref, h) for h in ctx.hops}
    mx.eval(list(ref_logits.values()))
    for c in ctx.controllers:
        for b in ctx.budgets:
            if (c, b) not in todo:
                progress.step()
                continue
            handoff = Handoff.named(c, b)
            # topology plans for the chain's own length: one replay per depth
            topology = handoff.mode == "topology"
            groups = [(h,) for h in ctx.hops] if topology else [tuple(ctx.hops)]
            for finals in groups:
                res = replay_cards(
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
    """Phase 3: real generation for problem ``i``, every configuration batched.

    One ``gen`` row per handoff and hop count in ``ctx.gen_hops`` not yet in
    the state: accuracy, agreement with ``ref`` and first divergent token;
    ``progress`` steps once.
    """
    gold = problem["final"]
    for h in ctx.gen_hops:
        key = ("gen", i, "exact", None, h)
        if key not in state:
            text = ref.finals[h]["text"]
            pred = extract_answer(text)
            state.add(
                {
                    "kind": "gen",
                    "problem": i,
                    "mode": "exact",
                    "budget_bits": None,
                    "hops": h,
                    "answer": pred,
                    "correct": numeric_match(pred, gold),
                    "agreement": True,
                    "first_divergence": None,
                    "reply": ref.finals[h]["reply"],
                }
            )
    todo = [
        Handoff.named(c, b)
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
    plain = [Handoff("exact")] + [h for h in todo if h.mode != "topology"]
    groups = [(plain, tuple(ctx.gen_hops))]
    topo = [h for h in todo if h.mode == "topology"]
    groups += [(topo, (n,)) for n in ctx.gen_hops if topo]
    for handoffs, finals in groups:
        middle, answerer = ctx.agents(max(finals))
        runs = run_chains(
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
                pred = extract_answer(f["text"])
                exact = extract_answer(ref.finals[h]["text"])
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
                        "correct": numeric_match(pred, gold),
                        "agreement": pred == exact,
                        "first_divergence": first_divergence(
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
