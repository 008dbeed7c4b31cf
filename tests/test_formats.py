"""Format definitions (formats): bit widths and group sizes are validated
with the field, the expected set and the received value."""

import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig, validate_bits


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
