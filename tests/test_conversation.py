"""qkvshare_mlx.conversation: what a card covers, the receiver's turn, chains.

Tier (b) on a tiny random model with the default model's tokenizer and chat
template (``tiny_chat_model_dir``), tier (c) on the real default model."""

import pytest
from conftest import assert_inherits

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.conversation import (
    CardOptions,
    ChainAgent,
    Conversation,
    receive,
    run_chat_chain,
    send,
    start,
    turn,
)
from qkvshare_mlx.fingerprint import fingerprint
from qkvshare_mlx.handoff import continue_from_card, greedy_tokens

GSM8K_LIKE = (
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it "
    "sold 14 muffins and 23 cookies. On Tuesday it sold twice as many muffins "
    "and 5 fewer cookies than on Monday. How much money did the bakery make on "
    "the two days together?"
)
LOSSLESS = CardOptions("uniform", 16.0)


@pytest.fixture(scope="module")
def tiny_chat(tiny_chat_model_dir):
    from qkvshare_mlx.models import load_model

    return load_model(tiny_chat_model_dir, dtype="float32")


def _render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.slow
def test_a_prompt_card_is_what_mlx_lm_cache_prompt_caches(tiny_chat):
    _, tok = tiny_chat
    conv = start(tok, GSM8K_LIKE)
    # mlx_lm.cache_prompt: the user message left open
    want = tok.apply_chat_template(
        [{"role": "user", "content": GSM8K_LIKE}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert conv.tokens == list(want) and conv.open
    # the receiver's prompt continues it and closes it, as mlx_lm.generate does
    ids, messages = turn(tok, conv, " Go")
    whole = _render(
        tok,
        [{"role": "user", "content": GSM8K_LIKE + " Go"}],
        add_generation_prompt=True,
    )
    assert ids == tok.encode(whole, add_special_tokens=False)
    assert ids[: len(conv.tokens)] == conv.tokens
    assert messages == [{"role": "user", "content": GSM8K_LIKE + " Go"}]


@pytest.mark.slow
def test_receiver_turn_after_a_reply_is_a_new_user_turn(tiny_chat):
    model, tok = tiny_chat
    card, gen = send(model, tok, GSM8K_LIKE, generate_tokens=6, card=LOSSLESS)
    assert card.user["open"] is False and card.user["messages"][-1]["role"] == (
        "assistant"
    )
    conv = Conversation.of_card(card)
    ids, messages = turn(tok, conv, "Check it.")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    # the card's ids (the generated ones kept as they were) begin the prompt
    assert ids[: card.n_tokens] == card.tokens.tolist()
    assert ids[card.n_tokens :] == tok.encode(
        "<|im_start|>user\nCheck it.<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    assert card.tokens.tolist()[-len(gen.tokens) - 2 : -2] == gen.tokens


@pytest.mark.slow
def test_receive_hands_on_a_card_that_inherits_bit_for_bit(tiny_chat):
    model, tok = tiny_chat
    opts = CardOptions("saliency", 4.5)
    first, _ = send(model, tok, GSM8K_LIKE, generate_tokens=4, card=opts)
    gen, second = receive(first, model, tok, "Check it.", max_tokens=4, hand_on=opts)
    assert second.n_tokens > first.n_tokens and gen.n_reused == first.n_tokens
    assert_inherits(first, second)


@pytest.mark.slow
def test_lossless_receive_equals_the_receivers_own_prefill(tiny_chat):
    model, tok = tiny_chat
    card, _ = send(model, tok, GSM8K_LIKE, card=LOSSLESS)
    card = CacheCard.from_bytes(card.to_bytes())
    gen, _ = receive(card, model, tok, " Answer.", max_tokens=12)
    ids, _ = turn(tok, Conversation.of_card(card), " Answer.")
    eos = set(tok.eos_token_ids)
    assert gen.tokens == greedy_tokens(model, ids, max_tokens=12, eos=eos)
    assert gen.n_reused == card.n_tokens and gen.text == tok.decode(gen.tokens)


@pytest.mark.slow
def test_chat_chain_hands_every_hop_on(tiny_chat):
    model, tok = tiny_chat
    agents = [
        ChainAgent("solver", GSM8K_LIKE, max_tokens=4, budget_bits=4.5),
        ChainAgent("checker", "Check it.", max_tokens=4, budget_bits=3.0),
        ChainAgent("answerer", "The number?", max_tokens=4, budget_bits=4.5),
    ]
    hops, cards = run_chat_chain(model, tok, agents)
    assert [h["role"] for h in hops] == ["solver", "checker", "answerer"]
    assert len(cards) == 3
    assert [c.user["role"] for c in cards] == ["solver", "checker", "answerer"]
    assert cards[0].n_tokens < cards[1].n_tokens < cards[2].n_tokens
    assert cards[0].effective_bits <= 4.52
    assert hops[1]["n_reused"] == cards[0].n_tokens
    assert hops[2]["n_reused"] == cards[1].n_tokens
    assert_inherits(cards[0], cards[2])


@pytest.fixture(scope="module")
def default_model():
    from qkvshare_mlx.models import load_model

    return load_model(None, dtype="float32")


@pytest.mark.slow
def test_default_model_mixed_card_keeps_first_token(default_model):
    model, tok = default_model
    card, _ = send(model, tok, GSM8K_LIKE, card=CardOptions("saliency", 4.5))
    card = CacheCard.from_bytes(card.to_bytes(), expect=fingerprint(model, tok))
    assert len(card.width_histogram()) > 1 and card.effective_bits <= 4.52
    prompt, _ = turn(tok, Conversation.of_card(card), None)
    want = greedy_tokens(model, prompt, max_tokens=1)
    for mode in ("dequantize", "compressed"):
        got = continue_from_card(card, model, tok, prompt, mode=mode, max_tokens=1)
        assert got.tokens == want, mode
        assert got.n_reused == card.n_tokens


@pytest.mark.parametrize(
    "user, message",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 5}]}, "non-empty list"),
        ({"messages": [1]}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "a"}], "open": "false"}, "booleans"),
        (
            {"messages": [{"role": "assistant", "content": "a"}], "open": True},
            "only a user message can be open",
        ),
    ],
)
def test_a_malformed_conversation_in_a_card_is_a_format_error(user, message):
    from qkvshare_mlx.errors import CardFormatError
    from qkvshare_mlx.testing.mutations import small_card

    card = small_card()
    card.user = user
    with pytest.raises(CardFormatError, match=message):
        Conversation.of_card(card)
