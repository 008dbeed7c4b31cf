"""``qkvshare calibrate`` (cli/calibrate) and ``--layer-weights``."""

import json

import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.cli import main
from qkvshare_mlx.sensitivity import LayerSensitivity


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "{tmp}/none.txt", "--out", "{tmp}/p.json"], "no such file"),
        (["--text", "{tmp}/a.txt", "--out", "/nonexistent/p.json"], "does not exist"),
        (
            ["--text", "{tmp}/a.txt", "--out", "{tmp}/p.json", "--follow", "0"],
            "--follow",
        ),
        (
            ["--text", "{tmp}/a.txt", "--out", "{tmp}/p.json", "--budget-bits", "1"],
            "budget_bits",
        ),
        (["--text", "{tmp}/bin.txt", "--out", "{tmp}/p.json"], "UTF-8"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    extra, message, tmp_path, capsys, no_model
):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    args = ["calibrate"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkvshare: error: ")
    assert message in err[0]


def test_a_bad_profile_is_refused_before_the_model_loads(tmp_path, capsys, no_model):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"format": "qkvshare-layer-sensitivity", "version": 7}))
    for args in (
        ["make-card", "-p", "hi", "--out", str(tmp_path / "a.qkv")],
        ["chain", str(tmp_path / "spec.json")],
    ):
        if args[0] == "chain":
            (tmp_path / "spec.json").write_text(
                json.dumps({"agents": [{"prompt": "a"}, {"prompt": "b"}]})
            )
        assert main(args + ["--layer-weights", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "version must be 1 but got 7" in err[0]


@pytest.mark.slow
def test_calibrate_then_make_card_with_the_profile(tiny_chat_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    words = ["apples", "cost", "three", "dollars", "each", "and", "Tom", "buys"]
    texts = []
    for i in range(2):
        t = tmp_path / f"t{i}.txt"
        t.write_text(" ".join(rng.choice(words, 200)))
        texts.append(str(t))
    prof_path = tmp_path / "p.json"
    model = ["--model", str(tiny_chat_model_dir)]
    assert main(["calibrate", *model, "--text", *texts, "--out", str(prof_path)]) == 0
    prof = LayerSensitivity.load(prof_path)
    assert prof.samples == 2 and prof.n_layers >= 2
    outs = []
    for extra in ([], ["--layer-weights", str(prof_path)]):
        out = tmp_path / f"c{len(extra)}.qkv"
        args = ["make-card", *model, "-p", " ".join(words * 20), "--out", str(out)]
        assert main(args + ["--budget-bits", "3"] + extra) == 0
        outs.append(CacheCard.load(out))
    assert all(abs(c.effective_bits - 3.0) <= 0.02 for c in outs)


@pytest.mark.slow
def test_the_default_model_gets_its_shipped_profile_by_default(tmp_path):
    words = "Natalia sold clips to 48 of her friends in April, and then half as many"
    prompt = " ".join([words] * 12)
    bits = {}
    for setting in ("auto", "none"):
        out = tmp_path / f"{setting}.qkv"
        args = ["make-card", "-p", prompt, "--budget-bits", "3", "--out", str(out)]
        assert main(args + ["--layer-weights", setting]) == 0
        qkv = CacheCard.load(out).to_quantized()
        bits[setting] = [
            [
                sum(getattr(s, half).payload_bits() for s in layer)
                for layer in qkv.layers
            ]
            for half in ("keys", "values")
        ]
    ratio = np.array(bits["auto"]) / np.array(bits["none"])  # (2, L)
    # the profile weighs layer 0's keys 0.11 and layer 18's 13.9
    assert ratio[0, 0] < 0.9 and ratio[0, 18] > 1.2


@pytest.mark.slow
def test_a_profile_of_another_architecture_is_refused_before_work(
    tiny_chat_model_dir, tmp_path, capsys
):
    from importlib import resources

    profiles = resources.files("qkvshare_mlx") / "profiles"
    shipped = profiles / "smollm2-135m-instruct.json"
    out = tmp_path / "a.qkv"
    args = ["make-card", "--model", str(tiny_chat_model_dir), "-p", "hi there"]
    assert main(args + ["--out", str(out), "--layer-weights", str(shipped)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another architecture" in err[0] and "n_layers" in err[0]
    assert not out.exists()
