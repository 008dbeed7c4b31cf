"""The card container's parsing limits (card/container)."""

import pytest

from qkvshare_mlx.card.container import json_depth
from qkvshare_mlx.errors import CardFormatError


def test_depth_limit_is_exact():
    nested = 1
    for _ in range(5):
        nested = [nested]
    assert json_depth(nested, 5) == 5
    with pytest.raises(CardFormatError):
        json_depth(nested, 4)
    assert json_depth({"a": [], "b": {"c": 1}}, 2) == 2
