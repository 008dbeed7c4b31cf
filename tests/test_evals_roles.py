"""The GSM8K study's role sequence."""

import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.evals.roles import gsm8k_agents


def test_gsm8k_roles():
    middle, answerer = gsm8k_agents(4)
    assert [a.role for a in middle] == ["solver", "checker", "calculator", "solver"]
    assert "####" in answerer.instruction
    with pytest.raises(ConfigError):
        gsm8k_agents(0)
