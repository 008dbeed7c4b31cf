"""A conversation handed from agent to agent, one card per hop.

The convention, the same in the API, the CLI and chains: **a card covers a
conversation prefix**, recorded in its ``user`` metadata as the messages it
was rendered from (``messages``) and whether the last one, a user message,
is still open (``open``):

- a sender's prompt alone is an *open* user message, rendered as
  ``mlx_lm.cache_prompt`` does (the chat template with
  ``continue_final_message``): a receiver's prompt continues that message
  and closes it, as ``mlx_lm.generate --prompt-cache-file`` does;
- a sender's prompt with its reply is a closed conversation ending at a turn
  boundary (the reply's end-of-turn included): a receiver's prompt is a new
  user turn.

A receiver never re-tokenizes the card's text: its ids are the card's ids
plus the rendered *difference* between the conversation with its turn (and
the generation prompt) and the conversation the card covers. So any
template that renders conversations prefix-stably works, strict
alternation included (the receiver's prompt never opens a second user turn
in a row); for one that does not, the receiver re-renders everything and
reuses the longest common prefix. A card made from token ids (no messages:
an mlx-lm prompt-cache file, the token API) counts as an open user message,
as mlx-lm treats it. Without a chat template (or ``chat=False``) turns are
plain text, blank lines between them.

:func:`send` makes the first card (optionally after the sender's own reply),
:func:`receive` continues from one (optionally handing on a card that
inherits its segments bit for bit), :func:`run_chat_chain` runs a chain.
All return data; nothing is printed or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .card import CacheCard
from .chat import encode, render
from .errors import CardFormatError, ConfigError
from .generation import GREEDY, Generation, SamplingOptions, generate
from .handoff import continue_from_card, make_card

MESSAGES_KEY, OPEN_KEY, CHAT_KEY = "messages", "open", "chat"
_QUERY = "\x00QUERY\x00"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages, *, open_last=False, generation_prompt=False) -> str:
    return render(tokenizer, messages, generation_prompt, open_last=open_last)


@dataclass
class Conversation:
    """A conversation prefix: its messages, whether the last user message is
    still open, and its token ids."""

    messages: list[dict] | None
    open: bool
    tokens: list[int]
    chat: bool

    @classmethod
    def of_card(cls, card: CacheCard) -> Conversation:
        """The conversation a card records, checked (its ``user`` metadata
        comes from a file): CardFormatError naming the field otherwise."""
        u = card.user
        messages = u.get(MESSAGES_KEY)
        is_open, chat = u.get(OPEN_KEY, True), u.get(CHAT_KEY, messages is None)
        if messages is not None and not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and isinstance(m["role"], str)
                and isinstance(m["content"], str)
                for m in messages
            )
        ):
            raise CardFormatError(
                "user.messages: expected a non-empty list of {role, content} "
                f"strings, got {messages!r:.80}"
            )
        if not isinstance(is_open, bool) or not isinstance(chat, bool):
            raise CardFormatError(
                f"user.open, user.chat: expected booleans, got {is_open!r:.20}, "
                f"{chat!r:.20}"
            )
        if messages is not None and is_open and messages[-1]["role"] != "user":
            raise CardFormatError(
                "user.open: only a user message can be open, the last message is "
                f"{messages[-1]['role']!r:.20}"
            )
        return cls(messages, is_open, card.tokens.tolist(), chat)

    def metadata(self) -> dict:
        return {MESSAGES_KEY: self.messages, OPEN_KEY: self.open, CHAT_KEY: self.chat}

    def text(self, tokenizer) -> str:
        if not self.chat:
            return "\n\n".join(m["content"] for m in self.messages)
        return _render(tokenizer, self.messages, open_last=self.open)


def _check_chat(tokenizer, chat: bool | None) -> bool:
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ConfigError(
            "chat: the tokenizer has no chat template (use chat=False, or "
            "--no-chat-template, for plain text)"
        )
    return chat


def start(tokenizer, prompt: str, *, system_prompt=None, chat=None) -> Conversation:
    """A sender's conversation: its prompt as an open user message."""
    chat = _check_chat(tokenizer, chat)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    conv = Conversation(messages, True, [], chat)
    text = conv.text(tokenizer)
    conv.tokens = encode(tokenizer, text, special=not chat)
    return conv


def _extended(tokenizer, conv: Conversation, new_text: str) -> list[int]:
    """The ids of ``new_text``, a rendering that should start with the
    conversation's: its ids plus the difference (else re-encoded whole)."""
    if conv.messages is not None:
        old = conv.text(tokenizer)
        if new_text.startswith(old):
            return conv.tokens + encode(tokenizer, new_text[len(old) :], False)
    return encode(tokenizer, new_text, special=not conv.chat)


def turn(tokenizer, conv: Conversation, prompt: str | None) -> tuple[list[int], list]:
    """A receiver's prompt ids: the conversation, its turn, the generation
    prompt; and the messages after that turn."""
    if not conv.chat:
        messages = None
        if conv.messages is not None:
            messages = conv.messages + (
                [{"role": "user", "content": prompt}] if prompt else []
            )
        extra = f"\n\n{prompt}" if prompt else ""
        return conv.tokens + encode(tokenizer, extra + "\n\n", False), messages
    if conv.messages is None:  # ids only: an open user message, as mlx-lm has it
        messages = [{"role": "user", "content": _QUERY}]
        text = _render(tokenizer, messages, generation_prompt=True)
        suffix = (prompt or "") + text[text.index(_QUERY) + len(_QUERY) :]
        return conv.tokens + encode(tokenizer, suffix, False), None
    messages = [dict(m) for m in conv.messages]
    if conv.open:
        messages[-1]["content"] += prompt or ""
    elif prompt:
        messages.append({"role": "user", "content": prompt})
    text = _render(tokenizer, messages, generation_prompt=True)
    return _extended(tokenizer, conv, text), messages


def with_reply(
    tokenizer, messages, prompt_ids: list[int], gen: Generation, chat: bool
) -> Conversation | None:
    """The conversation after a reply, closed at the turn boundary, its ids
    the prompt's, the generated ones and the end of the turn."""
    if messages is None:
        return None
    messages = messages + [{"role": "assistant", "content": gen.text}]
    if not chat:
        conv = Conversation(messages, False, [], False)
        conv.tokens = prompt_ids + list(gen.tokens)
        return conv
    prompt_text = _render(tokenizer, messages[:-1], generation_prompt=True)
    closed = _render(tokenizer, messages)
    rest = closed[len(prompt_text) :] if closed.startswith(prompt_text) else None
    conv = Conversation(messages, False, [], True)
    if rest is not None and rest.startswith(gen.text):
        end = encode(tokenizer, rest[len(gen.text) :], False)
        conv.tokens = prompt_ids + list(gen.tokens) + end
    else:  # not prefix-stable: re-encode (the next card re-prefills more)
        conv.tokens = encode(tokenizer, closed, False)
    return conv


def receiver_ids(tokenizer, card: CacheCard, prompt: str | None):
    """A receiver's prompt ids for ``card`` (either runtime): the card's
    conversation, ``prompt`` as its turn, the generation prompt; and the
    conversation's messages after that turn (None for a card of ids only).

    Raises:
        CardFormatError: the card's conversation metadata is malformed.
        ConfigError: a chat card and a tokenizer without a chat template.
    """
    conv = Conversation.of_card(card)
    if conv.messages is None:  # ids only: the receiver's template decides
        conv.chat = has_chat_template(tokenizer)
    elif conv.chat:
        _check_chat(tokenizer, True)
    ids, messages = turn(tokenizer, conv, prompt)
    return conv, ids, messages


@dataclass
class CardOptions:
    """How a hop's card is made (see :func:`~qkvshare_mlx.handoff.make_card`)."""

    controller: str = "saliency"
    budget_bits: float = 4.5
    config: object = None
    plan: object = None
    extra: dict = field(default_factory=dict)  # further user metadata
    sensitivity: object = None  # a LayerSensitivity of the model, or None


def _card(
    model,
    tokenizer,
    conv: Conversation,
    opts: CardOptions,
    inherited=None,
    progress=None,
    allow_other_weights: bool = False,
):
    return make_card(
        model,
        tokenizer,
        conv.tokens,
        controller=opts.controller,
        budget_bits=opts.budget_bits,
        config=opts.config,
        plan=opts.plan,
        inherited=inherited,
        user={**opts.extra, **conv.metadata()},
        sensitivity=opts.sensitivity,
        progress=progress,
        allow_other_weights=allow_other_weights,
    )


def send(
    model,
    tokenizer,
    prompt: str,
    *,
    system_prompt: str | None = None,
    generate_tokens: int = 0,
    sampling: SamplingOptions = GREEDY,
    chat: bool | None = None,
    card: CardOptions | None = None,
    on_text=None,
    prompt_progress_callback=None,
) -> tuple[CacheCard, Generation | None]:
    """The first agent: its prompt (and, with ``generate_tokens``, its reply)
    as a card.

    Returns:
        ``(card, generation)``; ``generation`` is None without a reply.
    """
    conv = start(tokenizer, prompt, system_prompt=system_prompt, chat=chat)
    gen = None
    if generate_tokens:
        ids, messages = turn(tokenizer, conv, None)
        gen = generate(
            model,
            tokenizer,
            ids,
            max_tokens=generate_tokens,
            sampling=sampling,
            on_text=on_text,
            prompt_progress_callback=prompt_progress_callback,
        )
        conv = with_reply(tokenizer, messages, ids, gen, conv.chat)
    opts = card or CardOptions()
    return _card(model, tokenizer, conv, opts, progress=prompt_progress_callback), gen


def receive(
    card: CacheCard,
    model,
    tokenizer,
    prompt: str | None = None,
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = GREEDY,
    mode: str = "dequantize",
    policy: str = "prefix",
    hand_on: CardOptions | None = None,
    on_text=None,
    prompt_progress_callback=None,
    allow_other_weights: bool = False,
) -> tuple[Generation, CacheCard | None]:
    """An agent that continues from a card: its own turn (``prompt``, if any)
    and its reply; with ``hand_on``, a card of the conversation so far for
    the next agent, inheriting ``card``'s segments bit for bit.
    ``allow_other_weights`` accepts a card made with other weights of the
    same model (see :func:`~qkvshare_mlx.handoff.continue_from_card`).

    Returns:
        ``(generation, card handed on or None)``.
    """
    conv, ids, messages = receiver_ids(tokenizer, card, prompt)
    if hand_on is not None and messages is None:
        raise ConfigError(
            "card: handing on needs the conversation's messages, and this card "
            "was made from token ids"
        )
    gen = continue_from_card(
        card,
        model,
        tokenizer,
        ids,
        mode=mode,
        max_tokens=max_tokens,
        policy=policy,
        sampling=sampling,
        on_text=on_text,
        prompt_progress_callback=prompt_progress_callback,
        allow_other_weights=allow_other_weights,
    )
    if hand_on is None:
        return gen, None
    after = with_reply(tokenizer, messages, ids, gen, conv.chat)
    # a template that is not prefix-stable re-renders the past: no inheritance
    inherits = after.tokens[: card.n_tokens] == conv.tokens
    return gen, _card(
        model,
        tokenizer,
        after,
        hand_on,
        inherited=card if inherits else None,
        allow_other_weights=allow_other_weights,
    )


@dataclass(frozen=True)
class ChainAgent:
    """One agent of a chat chain: its turn, reply length and card settings."""

    role: str
    prompt: str
    max_tokens: int = 64
    controller: str = "saliency"
    budget_bits: float = 4.5


def run_chat_chain(
    model,
    tokenizer,
    agents: list[ChainAgent],
    *,
    system_prompt: str | None = None,
    sampling: SamplingOptions = GREEDY,
    mode: str = "dequantize",
    config=None,
    chat: bool | None = None,
    sensitivity=None,
) -> tuple[list[dict], list[CacheCard]]:
    """Agent 0 answers its prompt and hands on a card; each next agent adds
    its turn, answers and hands on a card inheriting the last one's segments
    (the final agent's card holds the whole conversation, for whoever comes
    next). ``config`` and ``sensitivity`` (a LayerSensitivity) are every
    card's (see :func:`~qkvshare_mlx.handoff.make_card`).

    Returns:
        ``(hops, cards)``: per agent a dict (role, reply, TTFT, reused
        tokens, card tokens, bytes, effective bits) and its card.
    """
    if len(agents) < 2:
        raise ConfigError(f"a chain needs at least 2 agents, got {len(agents)}")

    def opts(a: ChainAgent) -> CardOptions:
        return CardOptions(
            a.controller,
            a.budget_bits,
            config,
            extra={"role": a.role},
            sensitivity=sensitivity,
        )

    first = agents[0]
    card, gen = send(
        model,
        tokenizer,
        first.prompt,
        system_prompt=system_prompt,
        generate_tokens=first.max_tokens,
        sampling=sampling,
        chat=chat,
        card=opts(first),
    )
    hops, cards = [hop_row(first.role, gen, card)], [card]
    for agent in agents[1:]:
        gen, card = receive(
            cards[-1],
            model,
            tokenizer,
            agent.prompt,
            max_tokens=agent.max_tokens,
            sampling=sampling,
            mode=mode,
            hand_on=opts(agent),
        )
        hops.append(hop_row(agent.role, gen, card))
        cards.append(card)
    return hops, cards


def hop_row(role: str, gen: Generation | None, card: CacheCard | None) -> dict:
    """One hop's figures: the reply and its TTFT, the card handed on (tokens,
    fp16 and payload bytes, effective bits; file bytes once it is written,
    see :func:`card_size`)."""
    row: dict = {"role": role}
    if gen is not None:
        row.update(
            reply=gen.text,
            reply_tokens=len(gen.tokens),
            ttft_ms=gen.ttft_ms,
            n_reused=gen.n_reused,
            n_prefilled=gen.n_prefilled,
        )
    if card is not None:
        row.update(
            card_tokens=card.n_tokens,
            fp16_bytes=card.fp16_bytes,
            payload_bytes=card.payload_bytes,
            effective_bits=round(card.effective_bits, 4),
        )
    return row


def card_size(card: CacheCard, file_bytes: int | None = None) -> dict:
    """The one size figure of a card: file bytes against fp16 K/V bytes."""
    file_bytes = len(card.to_bytes()) if file_bytes is None else file_bytes
    return {
        "file_bytes": file_bytes,
        "fp16_bytes": card.fp16_bytes,
        "payload_bytes": card.payload_bytes,
        "x_smaller_than_fp16": round(card.fp16_bytes / max(file_bytes, 1), 3),
        "effective_bits": round(card.effective_bits, 4),
    }
