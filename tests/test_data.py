from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.data import clean_text, load_test, load_train, swap_frame
from kagglekit.errors import KKError
from kagglekit.synthetic import make_synthetic
from kagglekit.task import LMSYS

LABEL_COLUMNS = LMSYS.label_columns


def _write(tmp_path, df, name="train.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def _rows(n=6, seed=0):
    return make_synthetic(n, seed=seed, null_p=0.0)


# --- the real files -------------------------------------------------------------------------------------------


def test_real_train_sample(shared_arena):
    df, report = load_train(shared_arena / "train_sample.csv")
    assert len(df) == 100 and report.rows == 100 and not report.skipped
    assert df["label"].value_counts().to_dict() == {2: 36, 1: 33, 0: 31}  # A 31, B 33, tie 36 (README)
    multi = df[df["prompt"].map(len) > 1]
    assert len(multi) == 16
    for _, row in df.iterrows():
        assert len(row.prompt) == len(row.response_a) == len(row.response_b)
        assert all(isinstance(t, str) for t in row.prompt + row.response_a + row.response_b)
    assert df["id"].iloc[0] == "30192"  # ids kept as written in the file
    # every text can be encoded, emoji included
    assert any(ord(c) > 0xFFFF for t in df["response_a"] for s in t for c in s)
    for col in ("prompt", "response_a", "response_b"):
        for turns in df[col]:
            for s in turns:
                s.encode("utf-8")


def test_real_test_file(shared_arena):
    df, _ = load_test(shared_arena / "test.csv")
    assert df["id"].tolist() == pd.read_csv(shared_arena / "test.csv", dtype=str)["id"].tolist()
    assert "label" not in df


def test_truncated_file_error_skip_repair(shared_arena):
    path = shared_arena / "train_truncated_210.csv"
    with pytest.raises(KKError, match=r"train_truncated_210.csv: row id \d+: column response_\w is not valid JSON"):
        load_train(path)
    df, report = load_train(path, bad_rows="skip")
    assert len(df) + len(report.skipped) == 210 and len(report.skipped) > 100
    assert "skipped" in report.warnings()[0]
    df, report = load_train(path, bad_rows="repair")
    assert len(df) == 210 and report.repaired > 100


# --- bad input: one clear line naming the file, row or column --------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(KKError, match="nope.csv does not exist"):
        load_train(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(KKError, match="empty.csv is empty"):
        load_train(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",".join(_rows().columns) + "\n")
    with pytest.raises(KKError, match="has a header but no rows"):
        load_train(tmp_path / "header.csv")


def test_missing_column_is_named(tmp_path):
    p = _write(tmp_path, _rows().drop(columns=["winner_tie"]))
    with pytest.raises(KKError, match="missing column winner_tie"):
        load_train(p)
    p = _write(tmp_path, _rows().drop(columns=["response_b"]), "test.csv")
    with pytest.raises(KKError, match="missing column response_b"):
        load_test(p)


def test_labels_not_one_hot_names_row(tmp_path):
    df = _rows()
    df.loc[2, LABEL_COLUMNS] = [1, 1, 0]
    with pytest.raises(KKError, match=rf"row id {df.id[2]}: labels are not one-hot"):
        load_train(_write(tmp_path, df))
    df = _rows()
    df["winner_tie"] = df["winner_tie"].astype(str)
    df.loc[1, "winner_tie"] = "yes"
    with pytest.raises(KKError, match=rf"row id {df.id[1]}: label winner_tie='yes' is not a number"):
        load_train(_write(tmp_path, df))


def test_duplicate_ids(tmp_path):
    df = _rows()
    df.loc[3, "id"] = df.loc[1, "id"]
    with pytest.raises(KKError, match=rf"duplicate id {df.id[1]}"):
        load_train(_write(tmp_path, df))


@pytest.mark.parametrize(
    "cell, reason",
    [('["unclosed', "is not valid JSON"), ('"a string"', "is not a non-empty JSON list"), ("[]", "is not a non-empty JSON list"), ("[1, 2]", "holds a int")],
)
def test_bad_cell_names_row_and_column(tmp_path, cell, reason):
    df = _rows()
    df.loc[4, "response_a"] = cell
    with pytest.raises(KKError, match=rf"row id {df.id[4]}: column response_a {reason}"):
        load_train(_write(tmp_path, df))


def test_turn_count_mismatch(tmp_path):
    df = _rows()
    df.loc[0, "prompt"] = json.dumps(["one", "two"])
    df.loc[0, "response_a"] = json.dumps(["x"])
    df.loc[0, "response_b"] = json.dumps(["y"])
    with pytest.raises(KKError, match="turn counts differ: prompt 2, response_a 1, response_b 1"):
        load_train(_write(tmp_path, df))


def test_skip_bad_rows_counts_them(tmp_path):
    df = _rows(10)
    df.loc[[1, 5], "response_b"] = "not json"
    out, report = load_train(_write(tmp_path, df), bad_rows="skip")
    assert len(out) == 8 and len(report.skipped) == 2
    assert {rid for rid, _ in report.skipped} == {str(df.id[1]), str(df.id[5])}


def test_nulls_and_lone_surrogates(tmp_path):
    df = _rows(3)
    df.loc[0, "response_a"] = '[null]'
    df.loc[1, "prompt"] = '["bad \\ud83d surrogate"]'
    df.loc[2, "prompt"] = '["pair \\ud83d\\ude00 ok"]'
    out, report = load_train(_write(tmp_path, df))
    assert out["response_a"][0] == [""]
    assert out["prompt"][1] == ["bad \ufffd surrogate"]
    assert out["prompt"][2] == ["pair 😀 ok"]
    assert report.null_turns == 1 and report.surrogates_fixed == 1
    out["prompt"][1][0].encode("utf-8")  # would raise on a lone surrogate


def test_clean_text_joins_pairs_and_replaces_lone():
    assert clean_text("\ud83d\ude00") == ("😀", False)
    assert clean_text("x\udc00") == ("x\ufffd", True)
    assert clean_text("plain") == ("plain", False)


def test_swap_frame_maps_labels(tmp_path):
    df, _ = load_train(_write(tmp_path, _rows(30)))
    sw = swap_frame(df)
    assert (sw["response_a"] == df["response_b"]).all()
    expected = df["label"].map({0: 1, 1: 0, 2: 2})
    assert (sw["label"] == expected).all()
    assert (sw["winner_model_a"] == df["winner_model_b"]).all()
    assert (swap_frame(sw)["label"] == df["label"]).all()


def test_cli_bad_input_is_one_line_exit_1(tmp_path):
    df = _rows()
    df.loc[2, "prompt"] = "[oops"
    p = _write(tmp_path, df)
    r = run_cli("make-folds", "--train", p, "--out", tmp_path / "f.csv", "--k", "2")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"row id {df.id[2]}: column prompt is not valid JSON" in lines[0]
    assert "Traceback" not in r.output
    r = run_cli("make-folds", "--train", tmp_path / "missing.csv", "--out", tmp_path / "f.csv")
    assert r.exit_code == 1 and "missing.csv does not exist" in r.stderr


# --- synthetic ---------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_arena_shaped(tmp_path):
    a, b = make_synthetic(200, seed=5), make_synthetic(200, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(make_synthetic(200, seed=6))
    df, report = load_train(_write(tmp_path, a))
    assert report.null_turns > 0
    assert (df["prompt"].map(len) > 1).any()
    assert df["prompt"].map(tuple).duplicated().any()  # repeated prompts exercise grouping
    assert any(ord(c) > 0xFFFF for t in df["response_a"] for s in t for c in s)
    lengths = df["response_a"].map(lambda t: sum(len(s) for s in t))
    assert lengths.max() > 10 * lengths.median()


def test_synthetic_signal_decides_label():
    from kagglekit.synthetic import GOOD

    df = make_synthetic(600, seed=1, noise=0.0, null_p=0.0)

    def good(cell):
        return any(w in GOOD for turn in json.loads(cell) for w in turn.split())

    has_good_a, has_good_b = df["response_a"].map(good), df["response_b"].map(good)
    assert not (has_good_a & has_good_b).any()
    rule = (~has_good_a & has_good_b) * 1 + (~has_good_a & ~has_good_b) * 2
    assert (rule == df[list(LABEL_COLUMNS)].to_numpy().argmax(1)).all()


def test_cli_synth(tmp_path):
    out = tmp_path / "s.csv"
    r = run_cli("synth", "--n", "40", "--out", out)
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(out)) == 40
    assert run_cli("synth", "--n", "40", "--out", out).exit_code == 1  # refuses to overwrite
    r = run_cli("synth", "--n", "10", "--out", tmp_path / "t.csv", "--test")
    assert list(pd.read_csv(tmp_path / "t.csv").columns) == ["id", "prompt", "response_a", "response_b"]
