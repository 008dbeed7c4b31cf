"""Format definitions (formats): bit widths and group sizes are validated
with the field, the expected set and the received value."""

import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig, padded_dim, planned_bits, validate_bits


@pytest.mark.parametrize("bits", [1, 7, 9, 32, 0])
def test_bits_outside_the_set_are_named(bits):
    with pytest.raises(ConfigError, match=f"but got {bits}"):
        validate_bits(bits)
    with pytest.raises(ConfigError, match=f"but got {bits}"):
        QuantConfig(widths=(4, bits))


@pytest.mark.parametrize("group", [16, 48, 256])
def test_bad_group_sizes_are_named(group):
    with pytest.raises(ConfigError, match=f"group_size.*{group}"):
        QuantConfig(group_size=group)


def test_a_head_size_no_group_divides_gets_padded_rows_counted_in_its_bits():
    """80: per-token groups of 32 over rows of 96; per-channel keys unpadded."""
    assert padded_dim(80, 32) == 96 and padded_dim(64, 32) == 64
    menu = QuantConfig().menu(80)
    coded = [f for f in menu if not f.is_float]
    assert coded and {f.value_group for f in coded} == {32}
    f4 = next(f for f in coded if f.bits == 4 and f.key_group == 64)
    # 64 tokens of per-channel keys (80 x (4 + 32/64)) + values (96 x (4 + 1))
    assert planned_bits({f4: 64}, 80, 80, 16) == 64 * (80 * 4.5 + 96 * 5)
    tok = QuantConfig(key_layout="token", adaptive_groups=False).menu(80)
    assert {f.key_group for f in tok if not f.is_float} == {32}
    # a group that another group size would divide is not padded: refused
    with pytest.raises(ConfigError, match="head_dim 96"):
        QuantConfig(
            key_layout="token", group_size=64, adaptive_groups=False, widths=(4,)
        ).menu(96)


def test_split_menu_gives_keys_at_least_the_values_width():
    from qkvshare_mlx.formats import Format

    plain = QuantConfig(adaptive_groups=False).menu(64)
    split = QuantConfig(adaptive_groups=False, split_kv=True).menu(64)
    pairs = {(f.bits, f.vbits) for f in split if not f.is_float}
    codes = (2, 3, 4, 5, 6, 8)
    assert pairs == {(b, v) for b in codes for v in codes if v <= b}
    assert len(split) == len(pairs) + 1 and len(plain) == len(codes) + 1
    f = Format(6, "channel", 64, 64, value_bits=3)
    assert f.label() == "6/3b/kc64/v64" and f.vbits == 3
    assert f.nominal_cost() == ((6 + 0.5) + (3 + 0.5)) / 2
    assert planned_bits({f: 64}, 64, 64, 16) == 64 * 64 * (6.5 + 3.5)
    assert Format(4).vbits == 4 and Format(4).label() == "4b/kt64/v64"


def test_widths_from_keeps_the_wider_codes_and_float():
    from qkvshare_mlx.formats import ALL_BITS, widths_from

    assert widths_from(2) == ALL_BITS
    assert widths_from(3) == (3, 4, 5, 6, 8, 16)
    assert widths_from(8) == (8, 16)
    for bad in (1, 7, 16, True, "3"):
        with pytest.raises(ConfigError, match="min bits"):
            widths_from(bad)
