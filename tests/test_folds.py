from __future__ import annotations

import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.data import load_train
from kagglekit.errors import KKError
from kagglekit.folds import load_folds, make_folds, prompt_groups, select_fold


@pytest.fixture
def train_df(synth_train):
    return load_train(synth_train)[0]


def test_each_id_once_and_groups_never_split(train_df):
    folds = make_folds(train_df, k=5, seed=42)
    assert sorted(folds["id"]) == sorted(train_df["id"]) and folds["id"].is_unique
    groups = prompt_groups(train_df)
    per_group = pd.Series(folds["fold"].to_numpy()).groupby(groups).nunique()
    assert (per_group == 1).all()
    assert train_df["prompt"].map(tuple).duplicated().any()  # the fixture really has repeated prompts


def test_class_shares_close_to_overall(train_df):
    folds = make_folds(train_df, k=5, seed=42)
    merged = train_df.merge(folds, on="id")
    overall = merged["label"].value_counts(normalize=True)
    for _, part in merged.groupby("fold"):
        shares = part["label"].value_counts(normalize=True)
        assert (shares - overall).abs().max() < 0.06


def test_real_sample_folds(shared_arena):
    df, _ = load_train(shared_arena / "train_sample.csv")
    folds = make_folds(df, k=5, seed=42)
    assert folds["fold"].value_counts().min() >= 15


def test_cli_is_deterministic_and_protects_output(synth_train, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run_cli("make-folds", "--train", synth_train, "--k", "4", "--seed", "7", "--out", a).exit_code == 0
    assert run_cli("make-folds", "--train", synth_train, "--k", "4", "--seed", "7", "--out", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().splitlines()[0] == "id,fold"
    before = a.read_bytes()
    r = run_cli("make-folds", "--train", synth_train, "--k", "3", "--out", a)
    assert r.exit_code == 1 and "--force" in r.stderr and a.read_bytes() == before
    r = run_cli("make-folds", "--train", synth_train, "--k", "3", "--out", a, "--force")
    assert r.exit_code == 0 and a.read_bytes() != before
    assert "rows" in r.stdout and "tie" in r.stdout  # the Rich table


def test_different_seed_gives_different_folds(train_df):
    assert not make_folds(train_df, 5, 1)["fold"].equals(make_folds(train_df, 5, 2)["fold"])


def test_k_errors(train_df, synth_train, tmp_path):
    with pytest.raises(KKError, match="k must be at least 2"):
        make_folds(train_df, k=1)
    with pytest.raises(KKError, match="larger than the number of distinct prompts"):
        make_folds(train_df.head(4), k=5)
    r = run_cli("make-folds", "--train", synth_train, "--k", "1", "--out", tmp_path / "x.csv")
    assert r.exit_code == 1 and "k must be at least 2" in r.stderr


def test_load_and_select_fold(train_df, tmp_path):
    folds = make_folds(train_df, k=3, seed=0)
    p = tmp_path / "f.csv"
    folds.to_csv(p, index=False)
    loaded = load_folds(p, train_df["id"])
    tr, va = select_fold(loaded, 1)
    assert tr.isdisjoint(va) and len(tr) + len(va) == len(train_df)
    with pytest.raises(KKError, match=r"fold 7 is not in .* \(folds: 0, 1, 2\)"):
        select_fold(loaded, 7)
    folds.iloc[1:].to_csv(p, index=False)
    with pytest.raises(KKError, match="have no fold"):
        load_folds(p, train_df["id"])
