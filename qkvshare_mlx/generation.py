"""Receivers generate through the host library; one result type for both runtimes.

:func:`generate` runs mlx-lm's own ``stream_generate`` (sampling through
``make_sampler``, logits processors, prefill progress, streamed text) over a
prompt cache, or ``generate_step`` where no tokenizer is at hand (token ids
only, no EOS); it keeps no decoding loop of its own. The transformers side
(``qkvshare_converters.hf_cache.continue_hf``) runs ``model.generate`` and
returns the same :class:`Generation`.

MLX is imported inside the functions: :class:`Generation` and
:class:`SamplingOptions` serve the transformers side without MLX.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen (mlx-lm's ``make_sampler`` options).

    Attributes:
        temp: temperature; 0 is greedy.
        top_p, min_p, top_k: nucleus, min-p and top-k filtering (0: off).
        seed: seeds ``mx.random`` (or torch) before generating, if set.
    """

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.temp < 0 or not 0 <= self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise ConfigError(
                "sampling: expected temp >= 0 and top_p, min_p in [0, 1], got "
                f"temp={self.temp}, top_p={self.top_p}, min_p={self.min_p}"
            )
        if self.top_k < 0:
            raise ConfigError(f"sampling: top_k must be >= 0 but got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def mlx_sampler(self):
        """mlx-lm's sampler for these options (seeding ``mx.random``)."""
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        return make_sampler(
            temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k
        )


GREEDY = SamplingOptions()


@dataclass
class Generation:
    """What a receiver generated, and what it cost.

    Attributes:
        tokens: generated ids (EOS excluded).
        text: their text ("" without a tokenizer).
        finish_reason: ``"stop"`` (EOS) or ``"length"``.
        ttft_ms: time to the first generated token, from the start of the
            call (injection, alignment and the suffix prefill included).
        prompt_tps: prompt (suffix prefill) tokens per second.
        generation_tps: generated tokens per second after the first.
        peak_memory_gb: the library's peak memory (MLX), or None.
        n_reused: card tokens reused from the cache.
        n_prefilled: prompt tokens prefilled after them.
        info: runtime details (mode, cache class, cache bytes, inject_ms...).
    """

    tokens: list[int]
    text: str = ""
    finish_reason: str = "length"
    ttft_ms: float | None = None
    prompt_tps: float | None = None
    generation_tps: float | None = None
    peak_memory_gb: float | None = None
    n_reused: int = 0
    n_prefilled: int = 0
    info: dict = field(default_factory=dict)

    def stats(self) -> dict:
        """The figures as a flat dict (for JSON)."""
        out = {k: v for k, v in vars(self).items() if k not in ("tokens", "info")}
        return {**out, **self.info, "n_generated": len(self.tokens)}


def check_max_tokens(max_tokens: int) -> int:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be an int >= 1 but got {max_tokens!r}")
    return max_tokens


def generate(
    model,
    tokenizer,
    prompt_tokens,
    *,
    prompt_cache=None,
    max_tokens: int = 256,
    sampling: SamplingOptions = GREEDY,
    logits_processors=None,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    started: float | None = None,
    eos=(),
) -> Generation:
    """Generate after ``prompt_tokens`` with mlx-lm, streaming text as it comes.

    Args:
        model: an mlx-lm model.
        tokenizer: its tokenizer (``TokenizerWrapper`` or HF), or None:
            token ids only, no EOS stop (``generate_step``).
        prompt_tokens: the ids still to feed (after what ``prompt_cache``
            holds).
        prompt_cache: an mlx-lm prompt cache (e.g. an injected card); left
            holding the prompt and the generated ids.
        max_tokens: most tokens to generate.
        sampling: temperature, top-p, min-p, top-k, seed.
        logits_processors: mlx-lm logits processors.
        prompt_progress_callback: ``(processed, total)`` during the prefill.
        on_text: called with each new piece of text (streaming).
        started: ``time.perf_counter()`` at which TTFT starts (default: now).
        eos: ids that stop generation when there is no tokenizer (with one,
            its own EOS ids do).

    Returns:
        A :class:`Generation`.
    """
    import mlx.core as mx

    check_max_tokens(max_tokens)
    tic = time.perf_counter() if started is None else started
    prompt = mx.array([int(t) for t in prompt_tokens], dtype=mx.int32)
    kwargs = dict(
        max_tokens=max_tokens,
        sampler=sampling.mlx_sampler(),
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        prompt_progress_callback=prompt_progress_callback,
    )
    before = prompt_cache[0].offset if prompt_cache else None
    gen = Generation(tokens=[], n_prefilled=prompt.size)
    if tokenizer is None:
        _generate_ids(gen, prompt, model, kwargs, tic, set(eos))
    else:
        _stream(gen, model, tokenizer, prompt, kwargs, tic, on_text)
    if before is not None:
        _trim_lookahead(prompt_cache, before + prompt.size + len(gen.tokens))
    return gen


def _stream(gen, model, tokenizer, prompt, kwargs, tic, on_text) -> None:
    from mlx_lm.generate import stream_generate

    pieces = []
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        if gen.ttft_ms is None:
            gen.ttft_ms = 1000 * (time.perf_counter() - tic)
        if r.finish_reason == "stop":
            gen.finish_reason = "stop"  # r.token is the EOS
        else:
            gen.tokens.append(int(r.token))
        if r.text:
            pieces.append(r.text)
            if on_text is not None:
                on_text(r.text)
        gen.prompt_tps, gen.generation_tps = r.prompt_tps, r.generation_tps
        gen.peak_memory_gb = r.peak_memory
    gen.text = "".join(pieces)


def _generate_ids(gen, prompt, model, kwargs, tic, eos) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t_first = None
    for token, _ in generate_step(prompt, model, **kwargs):
        if t_first is None:
            t_first = time.perf_counter()
            gen.ttft_ms = 1000 * (t_first - tic)
        if int(token) in eos:
            gen.finish_reason = "stop"
            break
        gen.tokens.append(int(token))
    n = len(gen.tokens)
    if t_first is not None and n > 1:
        gen.generation_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)
    if gen.ttft_ms:
        gen.prompt_tps = prompt.size / (gen.ttft_ms / 1000)
    gen.peak_memory_gb = mx.get_peak_memory() / 1e9


def _trim_lookahead(cache, keep: int) -> None:
    """mlx-lm feeds each sampled token before it yields the previous one: the
    cache may hold one token past the last generated one (or the EOS). Drop
    it, so the cache holds exactly the prompt and the generated ids (its
    ``offset`` is then ``keep``)."""
    from mlx_lm.models.cache import trim_prompt_cache

    over = cache[0].offset - keep
    if over > 0:
        trim_prompt_cache(cache, over)
