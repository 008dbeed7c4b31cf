"""Layer sensitivity (sensitivity, controllers' layer_weights): measuring it,
its file, and what it does to the allocation."""

import dataclasses
import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.handoff import make_card
from qkvshare_mlx.quant.controllers import TokenStats, with_sensitivity
from qkvshare_mlx.quant.mlx_backend import quantize_cache
from qkvshare_mlx.quant.numpy_backend import quantize_cache_np
from qkvshare_mlx.sensitivity import (
    LayerSensitivity,
    measure_sensitivity,
    text_samples,
)

L, H, T, D = 4, 2, 256, 32


@pytest.fixture(scope="module")
def kv():
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((1, H, T, D)).astype(np.float32) for _ in range(L)]
    values = [rng.standard_normal((1, H, T, D)).astype(np.float32) for _ in range(L)]
    attention = rng.random((L, T)) ** 4
    return keys, values, attention


def _layer_bits(qkv):
    """Bits per K/V element of each layer."""
    n = qkv.n_elements / len(qkv.layers)
    return np.array([sum(s.payload_bits() for s in layer) / n for layer in qkv.layers])


def test_layer_weights_move_bits_to_the_weighted_layer_within_the_budget(kv):
    keys, values, attention = kv
    cfg = QuantConfig(split_kv=True)
    plain = quantize_cache_np(
        keys, values, budget_bits=3.5, config=cfg, stats=TokenStats(attention)
    )
    w = np.ones((L, 2))
    w[2] = 50.0  # layer 2's errors matter 50x
    weighted = quantize_cache_np(
        keys,
        values,
        budget_bits=3.5,
        config=cfg,
        stats=TokenStats(attention, layer_weights=w),
    )
    a, b = _layer_bits(plain), _layer_bits(weighted)
    assert b[2] > a[2] + 0.5  # the weighted layer gets wider codes
    assert all(b[i] < a[i] for i in (0, 1, 3))  # paid for by the others
    assert abs(weighted.effective_bits - 3.5) <= 0.02


def test_layer_weights_of_one_value_change_nothing(kv):
    keys, values, attention = kv
    a = quantize_cache_np(keys, values, budget_bits=3.0, stats=TokenStats(attention))
    b = quantize_cache_np(
        keys,
        values,
        budget_bits=3.0,
        stats=TokenStats(attention, layer_weights=np.full((L, 2), 3.0)),
    )
    assert np.array_equal(_layer_bits(a), _layer_bits(b))
    assert a.effective_bits == b.effective_bits


def test_both_runtimes_allocate_the_same_with_layer_weights(kv):
    keys, values, attention = kv
    w = np.linspace(0.1, 10, 2 * L).reshape(L, 2)
    stats = TokenStats(attention, layer_weights=w)
    cfg = QuantConfig(split_kv=True)
    a = quantize_cache_np(keys, values, budget_bits=4.0, config=cfg, stats=stats)
    b = quantize_cache(
        [mx.array(k) for k in keys],
        [mx.array(v) for v in values],
        budget_bits=4.0,
        config=cfg,
        stats=stats,
    )
    assert np.array_equal(_layer_bits(a), _layer_bits(b))


@pytest.mark.parametrize(
    "weights, message",
    [
        (np.ones((L - 1, 2)), "expected (4, 2)"),
        (np.ones((L, 1)), "expected (4, 2)"),
        (np.zeros((L, 2)), "finite and positive"),
        (np.full((L, 2), np.nan), "finite and positive"),
        (np.full((L, 2), 1e300), "must lie in [0.001, 1000]"),
    ],
)
def test_bad_layer_weights_are_a_config_error(kv, weights, message):
    keys, values, attention = kv
    with pytest.raises(ConfigError, match=re.escape(message)):
        quantize_cache_np(
            keys,
            values,
            budget_bits=3.0,
            stats=TokenStats(attention, layer_weights=weights),
        )


# ----------------------------------------------------------------------------
# The profile file


def _profile(n=3):
    return LayerSensitivity(
        tuple((0.5 + i, 2.0 / (i + 1)) for i in range(n)),
        model="llama",
        samples=4,
        budget_bits=4.5,
    )


def test_profile_round_trips_through_its_file(tmp_path):
    prof = _profile()
    path = tmp_path / "p.json"
    prof.save(path)
    assert LayerSensitivity.load(path) == prof
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp left
    np.testing.assert_array_equal(prof.layer_weights(3), np.asarray(prof.weights))


def test_profile_for_another_layer_count_is_refused():
    with pytest.raises(ConfigError, match="measured on 3 layers .* has 30"):
        _profile().layer_weights(30)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "not json{", "not JSON"),
        (lambda d: {**d, "format": "other"}, "expected format"),
        (lambda d: {**d, "version": 9}, "version must be 1 but got 9"),
        (lambda d: {**d, "weights": "x"}, "list of \\[key, value\\] numbers"),
        (lambda d: {**d, "weights": [[1, 2, 3]]}, "list of \\[key, value\\]"),
        (lambda d: {**d, "weights": [[True, 1]]}, "list of \\[key, value\\]"),
        (lambda d: {**d, "weights": [[1, -1]]}, "finite and positive"),
        (lambda d: {**d, "weights": []}, "must be \\(layers, 2\\)"),
        (lambda d: {**d, "samples": "many"}, "samples must be an integer"),
        (lambda d: {**d, "samples": 0}, "samples must be a count >= 1"),
        (lambda d: {**d, "version": True}, "version must be 1 but got True"),
        (lambda d: {**d, "model": 7}, "model must be a string"),
        (lambda d: {**d, "controller": "nope"}, "controller 'nope' is not one of"),
        (lambda d: {**d, "budget_bits": "4"}, "budget_bits must be a number"),
        (lambda d: {**d, "weights": [[1e300, 1]]}, "must lie in \\[0.001, 1000\\]"),
        (lambda d: {**d, "weights": [[1e-9, 1]]}, "must lie in"),
        (lambda d: {**d, "weights": [[10**400, 1]]}, "int too large|out of range"),
        (lambda d: "[" * 100_000 + "]" * 100_000, "not JSON"),
        (lambda d: json.dumps(d) + " " * (2 << 20), "over the 1048576"),
        (lambda d: [1, 2], "expected format"),
    ],
)
def test_bad_profile_files_are_one_config_error(tmp_path, edit, message):
    d = json.loads(_profile().to_json())
    out = edit(d)
    path = tmp_path / "bad.json"
    path.write_text(out if isinstance(out, str) else json.dumps(out))
    with pytest.raises(ConfigError, match=message):
        LayerSensitivity.load(path)


def test_missing_profile_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        LayerSensitivity.load(tmp_path / "none.json")


def test_text_samples_cut_the_continuation():
    assert text_samples([list(range(20))], follow=5) == [
        (list(range(15)), list(range(15, 20)))
    ]
    with pytest.raises(ConfigError, match="has 10 tokens, expected at least 13"):
        text_samples([list(range(10))], follow=5)


# ----------------------------------------------------------------------------
# Measuring it on a model


ONE_FORMAT = QuantConfig(
    widths=(4,), adaptive_groups=False, group_size=32, key_group=32
)


def _samples(n=2, T=96, follow=16, seed=3):
    rng = np.random.default_rng(seed)
    return [
        (list(rng.integers(0, 100, T)), list(rng.integers(0, 100, follow)))
        for _ in range(n)
    ]


def _one_format_budget():
    (fmt,) = ONE_FORMAT.menu(32)  # one format: every token gets it
    return fmt.nominal_cost(ONE_FORMAT.float_bits)


@pytest.fixture(scope="module")
def measured(tiny_mlx):
    samples = _samples()
    budget = _one_format_budget()
    prof = measure_sensitivity(
        tiny_mlx, samples, budget_bits=budget, config=ONE_FORMAT, probe_queries=8
    )
    return samples, budget, prof


def test_measured_profile_is_per_layer_and_normalised(tiny_mlx, measured):
    _, _, prof = measured
    w = np.asarray(prof.weights)
    assert w.shape == (len(tiny_mlx.layers), 2) and (w > 0).all()
    assert np.exp(np.log(w).mean()) == pytest.approx(1.0)
    assert prof.samples == 2 and prof.controller == "saliency"
    assert len(set(w.ravel().round(6))) > 1  # the layers differ


def test_measured_sensitivity_follows_the_error_scale_of_a_layer(measured):
    """Scaling layer 1's value projection by c (and its output projection by
    1/c) leaves the model's function unchanged and scales that layer's value
    errors by c (MSE by c^2) at one fixed format: its weight per unit of
    error must fall by c^2 against every other layer-half."""
    samples, budget, prof = measured
    c = 4.0
    twin = tiny_llama().mlx_model  # the same weights (seed 0)
    attn = twin.layers[1].self_attn
    attn.v_proj.weight = attn.v_proj.weight * c
    attn.o_proj.weight = attn.o_proj.weight / c
    mx.eval(twin.parameters())
    scaled = measure_sensitivity(
        twin, samples, budget_bits=budget, config=ONE_FORMAT, probe_queries=8
    )
    a, b = np.asarray(prof.weights), np.asarray(scaled.weights)
    ratio = (b[1, 1] / np.delete(b.ravel(), 3)) / (a[1, 1] / np.delete(a.ravel(), 3))
    np.testing.assert_allclose(ratio, 1 / c**2, rtol=0.1)


def test_measure_needs_samples_and_an_adaptive_controller(tiny_mlx):
    with pytest.raises(ConfigError, match="at least one sample"):
        measure_sensitivity(tiny_mlx, [])
    with pytest.raises(ConfigError, match="weighs no tokens"):
        measure_sensitivity(tiny_mlx, _samples(1), controller="uniform")


def test_make_card_applies_a_profile(tiny_mlx, ids):
    n = len(tiny_mlx.layers)
    w = np.ones((n, 2))
    w[0] = 100.0
    prof = LayerSensitivity(tuple(map(tuple, w)))
    kw = dict(controller="saliency", budget_bits=3.0)
    plain = make_card(tiny_mlx, None, ids, **kw)
    weighted = make_card(tiny_mlx, None, ids, sensitivity=prof, **kw)
    bits = [_layer_bits(c.to_quantized()) for c in (plain, weighted)]
    assert bits[1][0] > bits[0][0]
    with pytest.raises(ConfigError, match="measured on 3 layers"):
        make_card(tiny_mlx, None, ids, sensitivity=_profile(3), **kw)


def test_with_sensitivity_leaves_stats_without_a_profile():
    stats = TokenStats(np.ones((2, 4)))
    assert with_sensitivity(stats, None, 2) is stats
    got = with_sensitivity(stats, _profile(2), 2)
    assert got.attention is stats.attention and got.layer_weights.shape == (2, 2)


def test_shipped_profiles_are_valid_and_matched_by_architecture(tiny_mlx, monkeypatch):
    from importlib import resources

    import qkvshare_mlx.sensitivity as S

    folder = resources.files("qkvshare_mlx") / "profiles"
    shipped = [e for e in folder.iterdir() if e.name.endswith(".json")]
    assert shipped  # the default model's profile ships with the package
    for entry in shipped:
        prof = LayerSensitivity.from_json(entry.read_text())
        arch = dict(prof.architecture)
        assert set(arch) == set(S.ARCH_KEYS) and arch["n_layers"] == prof.n_layers
    assert S.shipped_profile(tiny_mlx) is None  # no tiny architecture ships
    prof = LayerSensitivity.from_json(shipped[0].read_text())
    monkeypatch.setattr(S, "architecture_of", lambda model: prof.architecture)
    assert S.shipped_profile(tiny_mlx) == prof


def test_a_profile_of_another_architecture_is_refused(tiny_mlx):
    import qkvshare_mlx.sensitivity as S

    arch = dict(S.architecture_of(tiny_mlx))
    n = arch["n_layers"]
    mine = dataclasses.replace(_profile(n), architecture=tuple(sorted(arch.items())))
    mine.check_model(tiny_mlx)  # its own architecture: accepted
    other = {**arch, "head_dim": arch["head_dim"] * 2, "vocab_size": 7}
    foreign = dataclasses.replace(mine, architecture=tuple(sorted(other.items())))
    with pytest.raises(ConfigError, match="another architecture.*head_dim.*vocab_size"):
        foreign.check_model(tiny_mlx)
    with pytest.raises(ConfigError, match=f"measured on {n + 1} layers"):
        _profile(n + 1).check_model(tiny_mlx)  # no architecture recorded
    _profile(n).check_model(tiny_mlx)


def test_shipped_profiles_are_committed_measurements():
    from importlib import resources
    from pathlib import Path

    results = Path(__file__).parent.parent / "bench" / "results"
    measured = [
        LayerSensitivity.from_json(p.read_text())
        for p in sorted(results.glob("sensitivity*.json"))
        if not p.name.endswith(".meta.json")
    ]
    folder = resources.files("qkvshare_mlx") / "profiles"
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            assert LayerSensitivity.from_json(entry.read_text()) in measured, entry.name


def test_a_saved_profile_gets_the_permissions_open_would_give(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        _profile().save(tmp_path / "p.json")
    finally:
        os.umask(mask)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o644
