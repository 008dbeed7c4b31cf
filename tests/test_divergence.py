"""qkvshare_mlx.divergence: KL and top-1 of teacher-forced logits."""

import math

import numpy as np

from qkvshare_mlx.divergence import kl_top1, log_softmax, per_position


def test_kl_of_two_known_distributions():
    p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    kl, top1 = kl_top1(np.log(p)[None] + 3.0, np.log(q)[None] - 1.0)  # shifts: same
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert math.isclose(kl, want, rel_tol=1e-12)
    assert top1 == 1.0  # q's tie goes to the first token, p's argmax
    assert kl_top1(np.log(p)[None], np.log(p)[None]) == (0.0, 1.0)


def test_top1_is_the_share_of_positions_whose_argmax_agrees():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    got = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert kl_top1(ref, got)[1] == 0.5


def test_log_softmax_is_stable_for_large_logits():
    x = np.array([[1e4, 1e4 - 1.0, -1e4]])
    out = np.exp(log_softmax(x))
    assert np.isfinite(out).all() and math.isclose(out.sum(), 1.0)


def test_per_position_scores_each_row_and_kl_top1_is_their_mean():
    rng = np.random.default_rng(0)
    ref, got = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    kl, match = per_position(ref, got)
    assert kl.shape == (5,) and match.dtype == bool
    for i in range(5):
        assert math.isclose(kl[i], kl_top1(ref[i : i + 1], got[i : i + 1])[0])
        assert match[i] == (ref[i].argmax() == got[i].argmax())
    assert kl_top1(ref, got) == (float(kl.mean()), float(match.mean()))
