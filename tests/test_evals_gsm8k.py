"""GSM8K data loading, answer extraction and answer matching."""

import json

import pytest

from qkvshare_mlx.errors import QKVShareError
from qkvshare_mlx.evals import gsm8k


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,200", "1200"),
        ("#### -5", "-5"),
        ("The answer is 1,200.50.", "1200.5"),
        ("So she pays $3.00 in total.", "3"),
        ("First 12 eggs, then 7 more, so 19", "19"),
        ("It is 4 now; #### 7 was the mark, later 9", "7"),
        ("x = -3", "-3"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_load_problems_from_explicit_folder(tmp_path):
    rows = [
        {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
        {"question": "How many?", "answer": "#### 1,024"},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = gsm8k.load_problems("test", data_dir=tmp_path)
    assert [p["final"] for p in problems] == ["2", "1024"]
    assert problems[0]["question"] == "1+1?"
    assert len(gsm8k.load_problems("test", n=1, data_dir=tmp_path)) == 1


def test_load_problems_rejects_bad_rows(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "no answer"}\n')
    with pytest.raises(QKVShareError, match="test.jsonl:1"):
        gsm8k.load_problems("test", data_dir=tmp_path)


def test_env_var_must_be_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(gsm8k.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(QKVShareError, match="QKVSHARE_GSM8K"):
        gsm8k.find_gsm8k_dir()


def test_real_data_first_problem():
    try:
        problems = gsm8k.load_problems("test", n=1)
    except QKVShareError:
        pytest.skip("GSM8K data not found beside the repository")
    assert problems[0]["final"] == "18"  # Janet's ducks


def test_numeric_match():
    assert gsm8k.numeric_match("18", "18.0")
    assert gsm8k.numeric_match("-3", "-3")
    assert not gsm8k.numeric_match("18", "81")
    assert not gsm8k.numeric_match(None, "1")
