"""Chat turns as token ids, prefix-stable, for every caller.

A card covers a conversation prefix; the next agent's prompt must begin
with exactly those ids. :class:`ChatFormat` renders the model's chat
template once around placeholder strings to learn the text between turns,
then builds each new turn alone and appends it, keeping generated ids as
they were (no re-tokenization drift): the token-level chains of
:mod:`qkvshare_mlx.agents`. :func:`render` is the one call of a chat
template (the conversation API, :mod:`qkvshare_mlx.conversation`, uses it
too); :func:`prompt_ids` turns a prompt given as text or ids into ids.

The module knows tokenizers and chat templates; nothing about caches.
"""

from __future__ import annotations

import numpy as np

from .align import token_ids
from .errors import ConfigError


def render(
    tokenizer, messages: list[dict], generation_prompt: bool, *, open_last=False
) -> str:
    """The chat template applied to ``messages`` as text.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: ``{"role", "content"}`` dicts.
        generation_prompt: end with an open assistant turn.
        open_last: leave the last message open (``continue_final_message``).

    Raises:
        ConfigError: the template refuses the turns (or there is none).
    """
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            continue_final_message=open_last,
        )
    except Exception as e:
        # jinja2's TemplateError and the template's raise_exception;
        # transformers' ValueError (no template, an unrenderable final message)
        if not isinstance(e, ValueError) and type(e).__name__ not in (
            "TemplateError",
            "TemplateSyntaxError",
        ):
            raise
        roles = [m.get("role") for m in messages]
        raise ConfigError(f"chat template refused the turns {roles}: {e}") from None


def encode(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids of ``text`` (``special``: add the tokenizer's BOS etc.)."""
    return list(tokenizer.encode(text, add_special_tokens=special))


def prompt_ids(tokenizer, prompt) -> np.ndarray:
    """A prompt as (n,) int64 token ids: ids as given, or text encoded by the
    tokenizer, with its special tokens unless the text already starts with
    the BOS token (as ``mlx_lm.stream_generate`` does).

    Raises:
        ConfigError: text without a tokenizer; EmptyTokensError: no ids.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError("prompt: text needs a tokenizer (pass token ids)")
        bos = getattr(tokenizer, "bos_token", None)
        special = bos is None or not prompt.startswith(bos)
        return token_ids(encode(tokenizer, prompt, special), "prompt")
    return token_ids(prompt, "prompt")


class ChatFormat:
    """Builds a conversation's token ids one turn at a time.

    The chat template is rendered once around placeholder strings to learn
    the text before and after a user turn; turns are then tokenized alone
    and concatenated, and the assistant's own token ids are kept as they
    were generated. So each agent's prompt is exactly the previous prompt
    plus new ids (no re-tokenization drift).

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` or HF tokenizer with a chat
            template.
        shots: few-shot ``(question, answer)`` pairs shown before the task.
    """

    _U, _A = "\x00USER\x00", "\x00ASSISTANT\x00"

    def __init__(self, tokenizer, shots=()):
        self.tokenizer = tokenizer
        self.shots = list(shots)
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
        if not self.eos and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos = {tokenizer.eos_token_id}
        render = self._render
        one = render([("user", self._U)], True)
        two = render(
            [("user", self._U), ("assistant", self._A), ("user", self._U)], True
        )
        if not two.startswith(one.split(self._U)[0]) or two.count(self._U) != 2:
            raise ConfigError("chat template: expected a prefix-stable template")
        after_answer = two.split(self._A, 1)[1]
        self._between, self._after_user = after_answer.split(self._U)
        if not one.endswith(self._after_user):
            raise ConfigError(
                "chat template: expected the same generation prompt after every "
                f"user turn, got {self._after_user!r} and {one!r}"
            )

    def _render(self, turns, generation_prompt):
        messages = [{"role": r, "content": c} for r, c in turns]
        return render(self.tokenizer, messages, generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, False)

    def opening(self, task: str, instruction: str) -> list[int]:
        """Few-shot turns, then the task and the first agent's instruction."""
        turns = []
        for q, a in self.shots:
            turns += [("user", q), ("assistant", a)]
        turns.append(("user", f"{task}\n\n{instruction}"))
        return self._ids(self._render(turns, True))

    def turn(self, instruction: str) -> list[int]:
        """Close the previous assistant reply and open a user turn."""
        return self._ids(self._between + instruction + self._after_user)

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids))
