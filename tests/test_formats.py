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
