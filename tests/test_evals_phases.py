"""The study's phases: reference chains stored in and read back from the state."""

import json

import numpy as np

from qkvshare_mlx.agents import ChainRun
from qkvshare_mlx.evals.phases import ref_to_row, row_to_ref


def test_ref_rows_round_trip():
    run = ChainRun(tokens=[1, 2, 3, 4], replies=[(2, 4)])
    run.finals = {
        1: {"prompt": [1, 2, 3, 4, 5], "reply": [6], "text": "6", "ttft_s": 0.1}
    }
    back = row_to_ref(json.loads(json.dumps(ref_to_row(0, run, 1))))
    assert back.tokens == run.tokens and back.replies == run.replies
    assert back.finals[1]["reply"] == [6] and back.reply_ids(0) == [3, 4]
    assert np.isclose(back.finals[1]["ttft_s"], 0.1)
