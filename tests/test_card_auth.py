"""Card signatures (qkvshare_mlx/card/auth.py, spec section 11): a signed card
is accepted with the right key over every transport, and refused unsigned,
with another key, and after any single-byte change."""

import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.card.auth import ENV_KEY, CardKey, load_key
from qkvshare_mlx.errors import (
    CardAuthError,
    CardError,
    CardTooLargeError,
    ConfigError,
)
from qkvshare_mlx.testing import mutations as F
from qkvshare_mlx.transport import DirectoryTransport, MemoryTransport

KEY = CardKey(b"k" * 32)
OTHER = CardKey(b"o" * 32)
CARD = F.small_card(0)
SIGNED = CARD.to_bytes(key=KEY)


def test_signing_keeps_the_checksum_and_the_content():
    unsigned = CacheCard.from_bytes(CARD.to_bytes())
    card = CacheCard.from_bytes(SIGNED, key=KEY)
    assert card.checksum() == unsigned.checksum() == CARD.checksum()
    assert card.key_id == KEY.key_id and unsigned.key_id is None
    assert card.to_bytes(key=KEY) == SIGNED  # deterministic: re-signs identically


def test_a_saved_signed_card_is_its_signed_bytes(tmp_path):
    path = CARD.save(tmp_path / "a.qkv", key=KEY)
    assert path.read_bytes() == SIGNED
    assert CacheCard.load(path, key=KEY).key_id == KEY.key_id


def test_unsigned_card_refused_by_a_keyed_receiver():
    with pytest.raises(CardAuthError, match=f"unsigned.*{KEY.key_id}"):
        CacheCard.from_bytes(CARD.to_bytes(), key=KEY)


def test_other_key_refused_naming_both_key_ids():
    with pytest.raises(CardAuthError) as e:
        CacheCard.from_bytes(CARD.to_bytes(key=OTHER), key=KEY)
    assert OTHER.key_id in str(e.value) and KEY.key_id in str(e.value)


def test_a_receiver_without_key_reads_a_signed_card():
    assert CacheCard.from_bytes(SIGNED).checksum() == CARD.checksum()


def test_every_single_byte_change_is_refused():
    # every byte of the header region and a stride of the data region
    (n,) = np.frombuffer(SIGNED[:8], "<u8")
    positions = list(range(0, 8 + int(n))) + list(range(8 + int(n), len(SIGNED), 97))
    for i in positions:
        data = bytearray(SIGNED)
        data[i] ^= 0x01
        with pytest.raises(CardError):
            CacheCard.from_bytes(bytes(data), key=KEY)


def test_key_from_env_and_file(tmp_path):
    hexkey = (b"e" * 16).hex()
    assert load_key(env={ENV_KEY: hexkey}).secret == b"e" * 16
    f = tmp_path / "card.key"
    f.write_text(hexkey + "\n")
    assert load_key(key_file=f).secret == b"e" * 16
    assert load_key(env={}) is None
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_key("abcd")
    with pytest.raises(ConfigError, match="hex"):
        load_key(env={ENV_KEY: "not hex at all"})
    assert "6" * 8 not in repr(load_key(hexkey))  # the secret never shows


@pytest.mark.parametrize("kind", ["memory", "directory"])
def test_transports_sign_and_require(kind, tmp_path):
    def make(key):
        if kind == "memory":
            return MemoryTransport(key=key)
        return DirectoryTransport(tmp_path / "drop", key=key)

    keyed = make(KEY)
    keyed.send(CARD, "bob")
    got = keyed.recv("bob", timeout=5)
    assert got.key_id == KEY.key_id and got.checksum() == CARD.checksum()
    # unsigned and other-key senders are refused by the keyed receiver
    for sender in (make(None), make(OTHER)):
        if kind == "memory":
            keyed.send_bytes(CARD.to_bytes(key=sender.options.key), "bob")
        else:
            sender.send(CARD, "bob")
        with pytest.raises(CardAuthError):
            keyed.recv("bob", timeout=5)


def test_max_tokens_refused_before_tensors():
    with pytest.raises(CardTooLargeError, match="cache.n_tokens.*48.*47"):
        CacheCard.from_bytes(SIGNED, max_tokens=47)
    assert CacheCard.from_bytes(SIGNED, max_tokens=48).n_tokens == 48


def test_max_tokens_defaults_to_the_models_context():
    config = {
        "model_type": "llama",
        "max_position_embeddings": 40,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_attention_heads": 2,
        "hidden_size": 128,
    }
    with pytest.raises(CardTooLargeError, match="at most 40"):
        CacheCard.from_bytes(SIGNED, expect=config)
