"""The GSM8K study's agents: who speaks in a chain, and what each is told.

Middle agents cycle solver -> checker -> calculator; the answerer ends the
chain with ``#### <number>``. The module knows the wording only: how agents
run and hand on context is ``qkvshare_mlx.agents``.
"""

from __future__ import annotations

from ..agents import Agent
from ..errors import ConfigError

_MIDDLE_ROLES = (
    ("solver", "Solve the problem step by step. Be brief."),
    ("checker", "Check the previous reasoning step by step and fix any mistake."),
    ("calculator", "Redo the arithmetic of the solution carefully."),
)
ANSWER_INSTRUCTION = (
    "Give only the final answer as a number, in the form '#### <number>'."
)


def gsm8k_agents(
    hops: int, *, middle_tokens: int = 48, answer_tokens: int = 32
) -> tuple[list[Agent], Agent]:
    """The documented GSM8K role sequence for a chain of ``hops`` handoffs.

    Middle agents cycle solver -> checker -> calculator -> solver ...; the
    answerer ends the chain. One hop: solver -> answerer.

    Returns:
        ``(middle_agents, answerer)`` with ``len(middle_agents) == hops``.
    """
    if hops < 1:
        raise ConfigError(f"hops must be >= 1 but got {hops}")
    middle = [
        Agent(*_MIDDLE_ROLES[k % len(_MIDDLE_ROLES)], max_tokens=middle_tokens)
        for k in range(hops)
    ]
    return middle, Agent("answerer", ANSWER_INSTRUCTION, max_tokens=answer_tokens)
