"""The Task: one definition per competition (LMSYS, WSDM), and the readers, folds, submissions and
importers that go through it. Fast: no model is trained here (tests/test_wsdm.py runs the whole chain)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.data import load_test, load_train, swap_frame
from kagglekit.errors import KKError
from kagglekit.io import write_table
from kagglekit.synthetic import make_synthetic
from kagglekit.task import LMSYS, TASKS, WSDM, get_task, same_task


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_swap_of_labels_and_of_probabilities_agree(task):
    y = np.arange(task.n_classes).repeat(3)
    # the one-hot of the swapped labels is the swapped one-hot, and swapping twice is the identity
    assert np.array_equal(task.one_hot(task.swap_labels(y)), task.swap_probs(task.one_hot(y)))
    assert np.array_equal(task.swap_labels(task.swap_labels(y)), y)
    assert task.swap_labels([0])[0] == 1 and task.swap_labels([1])[0] == 0  # A <-> B in every arena task
    assert len(task.prob_columns) == len(task.class_names) == task.n_classes
    assert get_task(task.name) is task and get_task(task) is task


def test_the_two_tasks():
    assert (LMSYS.n_classes, LMSYS.metric.name, LMSYS.cells, LMSYS.test_file, LMSYS.submission_columns) == (
        3, "log_loss", "json_turns", "test.csv", ("winner_model_a", "winner_model_b", "winner_tie"))
    assert (WSDM.n_classes, WSDM.metric.name, WSDM.cells, WSDM.test_file, WSDM.submission_columns) == (
        2, "accuracy", "plain", "test.parquet", ("winner",))
    with pytest.raises(KKError, match="known: lmsys, wsdm"):
        get_task("kaggle")
    with pytest.raises(KKError, match="different tasks"):
        same_task(["lmsys", "wsdm"])


def test_best_evaluation_follows_the_metric():
    # log loss: lower wins, whatever the accuracy
    assert LMSYS.improves(0.9, 0.9, 1.0, 1.0) and not LMSYS.improves(1.1, 1.1, 1.0, 1.0)
    # accuracy: higher wins even at a worse log loss; equal accuracy -> lower log loss; NaN never
    assert WSDM.improves(0.70, 0.60, 0.65, 0.55) and not WSDM.improves(0.60, 0.50, 0.70, 0.55)
    assert WSDM.improves(0.60, 0.55, 0.65, 0.55) and not WSDM.improves(0.70, 0.55, 0.65, 0.55)
    assert WSDM.improves(0.69, 0.5, float("inf"), None) and not WSDM.improves(float("nan"), 0.9, float("inf"), None)


def _wsdm_file(tmp_path, n=60, seed=0, name="train.parquet", **kw):
    df = make_synthetic(n, seed=seed, task=WSDM, **kw)
    write_table(tmp_path / name, df)
    return tmp_path / name, df


def test_wsdm_parquet_is_read_through_the_task(tmp_path):
    path, raw = _wsdm_file(tmp_path, null_p=0.1)
    assert pd.read_parquet(path).columns.tolist()[:5] == ["id", "prompt", "response_a", "response_b", "winner"]
    assert raw["prompt"].map(type).eq(str).all()  # plain strings, not JSON lists
    df, report = load_train(path, task=WSDM)
    assert df["id"].tolist() == raw["id"].tolist()  # string ids kept as they are (leading zeros)
    assert df["label"].tolist() == [WSDM.label_values.index(w) for w in raw["winner"]]
    assert all(len(c) == 1 for col in WSDM.text_columns for c in df[col])  # one turn per cell
    assert report.null_turns == int(raw[list(WSDM.text_columns)].isna().sum().sum()) > 0
    assert set(df["language"]) <= {"English", "Russian", "Chinese", "Vietnamese", "German", "Spanish", "Japanese", "Korean"}
    sw = swap_frame(df, WSDM)
    assert (sw["label"] == 1 - df["label"]).all()
    assert (sw["winner"] == df["winner"].map({"model_a": "model_b", "model_b": "model_a"})).all()
    assert (sw["response_a"] == df["response_b"]).all() and (sw["language"] == df["language"]).all()
    # the same rows as CSV read the same (the reader goes by the suffix, the cells by the task)
    raw.to_csv(tmp_path / "train.csv", index=False)
    df_csv, _ = load_train(tmp_path / "train.csv", task=WSDM)
    assert df_csv["label"].tolist() == df["label"].tolist()
    # test files have no label column
    write_table(tmp_path / "test.parquet", make_synthetic(10, seed=1, task=WSDM, with_labels=False))
    test_df, _ = load_test(tmp_path / "test.parquet", task=WSDM)
    assert len(test_df) == 10 and "winner" not in test_df.columns


def test_wsdm_bad_rows_are_named(tmp_path):
    path, raw = _wsdm_file(tmp_path, n=20)
    bad = raw.copy()
    bad.loc[3, "winner"] = "tie"
    write_table(path, bad)
    with pytest.raises(KKError, match=rf"row id {raw['id'][3]}: label winner='tie' is not one of model_a, model_b"):
        load_train(path, task=WSDM)
    df, report = load_train(path, "skip", WSDM)
    assert len(df) == 19 and report.skipped[0][0] == raw["id"][3]
    write_table(path, raw.assign(prompt=[[p] for p in raw["prompt"]]))  # list cells (LMSYS-like), not strings
    with pytest.raises(KKError, match=rf"row id {raw['id'][0]}: column prompt holds a ndarray, not a string"):
        load_train(path, task=WSDM)
    write_table(path, raw.drop(columns="winner"))
    with pytest.raises(KKError, match="missing column winner"):
        load_train(path, task=WSDM)
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(KKError, match="cannot be read as parquet"):
        load_train(path, task=WSDM)
    # an LMSYS loader given a WSDM file names what is missing, not a traceback
    write_table(path, raw)
    with pytest.raises(KKError, match="missing columns winner_model_a, winner_model_b, winner_tie"):
        load_train(path)


def test_label_submission_is_argmax_and_checked(tmp_path):
    from kagglekit.ensemble import check_submission, write_submission

    ids = np.array(["a1", "b2", "c3"])
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.5001, 0.4999]])
    sample = tmp_path / "sample_submission.csv"
    WSDM.sample_submission(ids).to_csv(sample, index=False)
    out = write_submission(ids, probs, tmp_path / "sub.csv", sample_submission=sample, task=WSDM)
    assert out.read_text() == "id,winner\na1,model_a\nb2,model_b\nc3,model_a\n"
    sub = pd.read_csv(out, dtype=str)
    bad = sub.assign(winner=["model_a", "tie", "model_b"])
    with pytest.raises(KKError, match="row id b2: winner='tie' is not one of model_a, model_b"):
        check_submission(bad, ids, task=WSDM)
    with pytest.raises(KKError, match="expected id,winner"):
        check_submission(LMSYS.submission_frame(ids, np.full((3, 3), 1 / 3)), ids, task=WSDM)
    LMSYS.sample_submission(ids).to_csv(tmp_path / "lmsys_sample.csv", index=False)  # another competition's sample
    with pytest.raises(KKError, match="differ from the submission's"):
        check_submission(sub, ids, tmp_path / "lmsys_sample.csv", task=WSDM)


def test_folds_keep_language_shares_even(tmp_path):
    from kagglekit.folds import fold_summary, make_folds

    path, _ = _wsdm_file(tmp_path, n=400, seed=5, repeat_prompt_p=0.0)
    df, _ = load_train(path, task=WSDM)

    def spread(folds):
        m = df.merge(folds, on="id")
        ct = pd.crosstab([m["label"], m["language"]], m["fold"])
        return (ct.max(axis=1) - ct.min(axis=1)).to_numpy()

    stratified = make_folds(df, k=3, seed=0, stratify_language="language")
    assert spread(stratified).max() <= 1  # every (label, language) pair split as evenly as it can be
    assert spread(stratified).sum() < spread(make_folds(df, k=3, seed=0)).sum()
    assert stratified.equals(make_folds(df, k=3, seed=0, stratify_language="language"))  # deterministic
    summary = fold_summary(df, stratified, WSDM)
    assert {"A", "B", "languages", "top language"} <= set(summary.columns) and "tie" not in summary.columns
    lmsys_df, _ = load_train(_lmsys_csv(tmp_path))
    with pytest.raises(KKError, match="needs a language column"):
        make_folds(lmsys_df, k=2, stratify_language="language")


def _lmsys_csv(tmp_path):
    make_synthetic(60, seed=2).to_csv(tmp_path / "lmsys.csv", index=False)
    return tmp_path / "lmsys.csv"


def test_cli_synth_and_make_folds_for_wsdm(tmp_path):
    r = run_cli("synth", "--task", "wsdm", "--n", "120", "--out", tmp_path / "train.parquet")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "train.parquet")
    assert {"winner", "language"} <= set(df.columns) and set(df["winner"]) == {"model_a", "model_b"}
    r = run_cli("make-folds", "--task", "wsdm", "--train", tmp_path / "train.parquet", "--k", "2", "--stratify-language",
                "--out", tmp_path / "folds.csv")
    assert r.exit_code == 0, r.output
    assert "languages" in r.stdout and sorted(pd.read_csv(tmp_path / "folds.csv")["fold"].unique()) == [0, 1]
    r = run_cli("make-folds", "--train", _lmsys_csv(tmp_path), "--stratify-language", "--out", tmp_path / "f2.csv")
    assert r.exit_code == 1 and "task lmsys has no language column" in r.stderr
    r = run_cli("synth", "--task", "kaggle", "--out", tmp_path / "x.csv")
    assert r.exit_code == 1 and "task 'kaggle' is not known" in r.stderr


def _hh_file(tmp_path):
    lines = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello, how can I help?\n\nHuman: a joke\n\nAssistant: a good one",
              "rejected": "\n\nHuman: hi\n\nAssistant: hello, how can I help?\n\nHuman: a joke\n\nAssistant: no"}] * 6
    lines = [{k: v + f" {i}" for k, v in x.items()} for i, x in enumerate(lines)]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return path


def test_hh_rlhf_reader_writes_the_tasks_format(tmp_path):
    from kagglekit.importers import import_frame

    hh = _hh_file(tmp_path)
    lm = import_frame("hh-rlhf", hh, seed=0)[0]
    ws = import_frame("hh-rlhf", hh, seed=0, task=WSDM)[0]
    assert json.loads(lm["prompt"][0]) == ["hi", "a joke"] and ws["prompt"][0] == "hi\n\na joke"  # plain: turns joined
    assert set(ws.columns) >= {"winner"} and not {"winner_model_a", "winner_tie"} & set(ws.columns)
    write_table(tmp_path / "hh.parquet", ws)
    df, _ = load_train(tmp_path / "hh.parquet", task=WSDM)
    # the label follows the chosen transcript, in both formats
    assert df["label"].tolist() == [int(m == "rejected") for m in ws["model_a"]]
    lm.to_csv(tmp_path / "hh.csv", index=False)
    assert load_train(tmp_path / "hh.csv")[0]["label"].tolist() == df["label"].tolist()


def test_config_task_field():
    from kagglekit.config import describe_fields, load_config
    from kagglekit.errors import ConfigError

    assert load_config(None, ["task=wsdm"]).task == "wsdm" and load_config().task == "lmsys"
    with pytest.raises(ConfigError, match="task"):
        load_config(None, ["task=kaggle"])
    desc = dict((k, d) for k, _, d in describe_fields())
    assert "wsdm" in desc["task"] and "accuracy" in desc["task"] and "parquet" in desc["data.train"]


def test_tune_maximises_accuracy_for_wsdm(tmp_path):
    optuna = pytest.importorskip("optuna")
    from kagglekit.tune import open_study

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    assert open_study("w", storage, task=WSDM).direction == optuna.study.StudyDirection.MAXIMIZE
    assert open_study("l", storage).direction == optuna.study.StudyDirection.MINIMIZE
    with pytest.raises(KKError, match="maximizes val accuracy"):
        open_study("l", storage, task=WSDM)


def test_data_import_writes_the_wsdm_format(tmp_path):
    from test_importers import _arena_rows

    from kagglekit.importers import import_data

    src = tmp_path / "arena.json"
    src.write_text(json.dumps(_arena_rows()))
    train = pd.DataFrame({"id": ["101"], "prompt": ["What is the capital of France?"], "response_a": ["Paris."],
                          "response_b": ["Lyon."], "winner": ["model_a"], "language": ["English"]})
    write_table(tmp_path / "train.parquet", train)
    write_table(tmp_path / "test.parquet", train.drop(columns=["winner", "language"]).assign(id=["201"], prompt=["Say hi"]))
    report = import_data("arena", src, tmp_path / "extra.parquet", tmp_path / "train.parquet", tmp_path / "test.parquet",
                         task_name="wsdm")
    out = pd.read_parquet(tmp_path / "extra.parquet")
    assert report.dropped["a tie (the task has no such class)"] == 2  # no tie in this competition
    assert report.dropped["same prompt+responses as a train row"] == 1
    assert "winner" in out.columns and not {"winner_model_a", "winner_tie"} & set(out.columns)
    assert out.loc[out["source_id"] == "q2", "prompt"].item() == "Hi\n\nHow are you?"  # plain text, turns joined
    df, _ = load_train(tmp_path / "extra.parquet", task=WSDM)  # reads back as WSDM train rows
    assert dict(zip(out["source_id"], df["label"])) == {"q1": 0, "q2": 1, "q6": 0}
