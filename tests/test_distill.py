"""Distillation without a CV leak: per-fold teacher labels (kk distill-labels), the student's loss (KL at a
temperature mixed with the hard labels), per-fold soft-label templates, data.extra's deduplication against the
train file and fold K's validation prompts, and the README's loop end to end on tiny models."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.config import load_config
from kagglekit.errors import KKError
from kagglekit.task import get_task

TASK = get_task("lmsys")
PROB = list(TASK.prob_columns)


# --- the loss ----------------------------------------------------------------------------------------------------------


def _np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_distill_loss_matches_a_hand_computation():
    """(1 - w) CE(smoothed hard) + w T^2 KL(softmax(log p / T) || softmax(z / T)), rows with one kind of label alone."""
    import torch

    from kagglekit.config import load_config
    from kagglekit.train import training_loss as distill_loss

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (5, 3))
    p = rng.dirichlet([1, 1, 1], 5)
    hard = np.array([0, 2, 1, -1, 1])  # row 3: a pseudo-labelled row (teacher only)
    p[4] = np.nan  # row 4: hard label only
    w, t, eps = 0.3, 2.0, 0.1
    tc = load_config(None, [f"train.distill.weight={w}", f"train.distill.temperature={t}", f"train.label_smoothing={eps}"]).train

    # numpy, independently: smoothed targets (1 - eps) one-hot + eps / C; teacher at T = softmax(log p / T)
    expected = 0.0
    for i in range(5):
        ce = 0.0
        if hard[i] >= 0:
            q = np.full(3, eps / 3)
            q[hard[i]] += 1 - eps
            ce = -(q * _np_log_softmax(z[i : i + 1])[0]).sum()
        kl = 0.0
        if not np.isnan(p[i]).any():
            pt = np.exp(np.log(p[i]) / t)
            pt /= pt.sum()
            kl = t * t * (pt * (np.log(pt) - _np_log_softmax(z[i : i + 1] / t)[0])).sum()
        if hard[i] >= 0 and not np.isnan(p[i]).any():
            expected += (1 - w) * ce + w * kl
        else:
            expected += ce + kl
    got = distill_loss(torch.tensor(z), torch.tensor(p), torch.tensor(hard), tc)
    assert abs(float(got) - expected) < 1e-9, (float(got), expected)


def test_smoothing_never_touches_the_teacher_and_no_teacher_is_plain_cross_entropy():
    import torch
    import torch.nn.functional as F

    from kagglekit.config import load_config
    from kagglekit.train import training_loss as distill_loss

    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    hard = torch.tensor([0, 2])
    cfg = lambda ls: load_config(None, ["train.distill.weight=1", f"train.label_smoothing={ls}"]).train  # noqa: E731
    # weight 1: only the teacher's term, and label smoothing does not flatten it
    assert float(distill_loss(z, p, hard, cfg(0.0))) == pytest.approx(float(distill_loss(z, p, hard, cfg(0.4))), abs=1e-12)
    # T = 1, weight 1: KL(p || q) = CE(p, q) - H(p)
    ce_soft = float(F.cross_entropy(z, p, reduction="sum"))
    entropy = float(-(p * p.log()).sum())
    assert float(distill_loss(z, p, hard, cfg(0.0))) == pytest.approx(ce_soft - entropy, abs=1e-12)
    # no teacher at all: the label-smoothed cross-entropy exactly as before
    assert float(distill_loss(z, None, hard, cfg(0.2))) == pytest.approx(
        float(F.cross_entropy(z, hard, label_smoothing=0.2, reduction="sum")), abs=1e-12)


def test_swapped_hard_labels_follow_the_task():
    assert TASK.swap_labels(np.array([0, 1, 2, -1])).tolist() == [1, 0, 2, -1]
    one_hot = TASK.one_hot([0, 1, 2])
    assert (TASK.swap_probs(one_hot).argmax(1) == TASK.swap_labels(np.array([0, 1, 2]))).all()


# --- soft labels per fold, and the leak warning ------------------------------------------------------------------------


def _fmt(cfg):
    from kagglekit.formatting import Formatter
    from kagglekit.modeling import load_tokenizer

    return Formatter.from_config(load_tokenizer(cfg.model.backbone), cfg.model)


def _folds(project):
    return pd.read_csv(project / "folds.csv", dtype={"id": str})


def test_soft_labels_template_reads_the_fold_file_and_never_smooths(tiny_project, tmp_path):
    from kagglekit.train import prepare_inputs

    folds = _folds(tiny_project)
    for k, p in ((0, [0.6, 0.3, 0.1]), (1, [0.1, 0.2, 0.7])):
        ids = folds.loc[folds["fold"] != k, "id"]
        pd.DataFrame({"id": ids, **dict(zip(PROB, p))}).to_csv(tmp_path / f"fold_{k}.csv", index=False)
    cfg = tiny_config(tiny_project, f"data.soft_labels={tmp_path}/fold_{{fold}}.csv", "train.label_smoothing=0.2")
    for k, p in ((0, [0.6, 0.3, 0.1]), (1, [0.1, 0.2, 0.7])):
        inputs = prepare_inputs(cfg, k, _fmt(cfg))
        n = len(inputs.train_df)
        assert np.allclose(inputs.targets[:n], p) and np.allclose(inputs.targets[n:], np.array(p)[list(TASK.swap)])
        assert (inputs.labels[:n] == inputs.train_df["label"].to_numpy()).all()
    with pytest.raises(KKError, match=r"fold_2.csv does not exist"):
        prepare_inputs(cfg, 2, _fmt(cfg))


def test_one_soft_label_file_for_every_fold_is_warned_as_a_leak(tiny_project, tmp_path, monkeypatch):
    import kagglekit.ui
    from kagglekit.train import prepare_inputs

    warnings = []
    monkeypatch.setattr(kagglekit.ui, "warn", warnings.append)
    train = pd.read_csv(tiny_project / "train.csv", dtype={"id": str})
    pd.DataFrame({"id": train["id"], **dict(zip(PROB, [0.5, 0.3, 0.2]))}).to_csv(tmp_path / "oof.csv", index=False)
    cfg = tiny_config(tiny_project, f"data.soft_labels={tmp_path / 'oof.csv'}")
    prepare_inputs(cfg, 0, _fmt(cfg))
    n_val = int((_folds(tiny_project)["fold"] == 0).sum())
    assert any(f"also labels {n_val} of fold 0's validation rows" in w and "kk distill-labels" in w for w in warnings), warnings


# --- kk distill-labels ------------------------------------------------------------------------------------------------


class FakeFoldModel:
    """A teacher fold whose probabilities say which teacher and which fold made them, and which row they are for."""

    calls: list = []

    def __init__(self, path, backbone=None):
        self.fold = int(path.name.split("_")[1])
        self.teacher = int(path.parent.name[-1])
        FakeFoldModel.calls.append((self.teacher, self.fold))

    def predict(self, df, tta=True, batch_size=None, progress=None, description="", cache=None):
        return {"probs": fake_probs(self.teacher, self.fold, df["id"])}

    def release(self):
        pass


def fake_probs(teacher, fold, ids):
    rows = np.array([int(str(i)[-3:]) % 7 for i in ids], dtype=float)
    logits = np.stack([np.full(len(rows), 0.5 * fold + teacher), 0.2 * rows, np.zeros(len(rows))], 1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _fake_teacher(root, name, folds, train, skip_val_of=None):
    """A teacher run folder: fold_K/metrics.json and fold_K/oof.csv on fold K's validation ids."""
    for k in sorted(folds["fold"].unique()):
        d = root / name / f"fold_{k}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text('{"val_log_loss": 1.0, "n_val": 1}')  # the keys a finished fold has
        (d / "config.yaml").write_text(load_config(None, []).to_yaml())  # and its config
        val = folds.loc[folds["fold"] == k, "id"]
        if skip_val_of == k:
            val = val.iloc[1:]
        pd.DataFrame({"id": val, **dict(zip(PROB, [0.4, 0.35, 0.25]))}).to_csv(d / "oof.csv", index=False)
    return root / name


def test_distill_labels_fold_k_comes_from_the_fold_k_teachers_only(tiny_project, tmp_path, monkeypatch):
    import kagglekit.predict

    monkeypatch.setattr(kagglekit.predict, "FoldModel", FakeFoldModel)
    FakeFoldModel.calls = []
    folds, train = _folds(tiny_project), pd.read_csv(tiny_project / "train.csv", dtype={"id": str})
    t1, t2 = _fake_teacher(tmp_path, "teacher1", folds, train), _fake_teacher(tmp_path, "teacher2", folds, train)
    extra = pd.read_csv(tiny_project / "test.csv", dtype={"id": str}).head(5).assign(id=lambda d: "x" + d["id"])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    r = run_cli("distill-labels", "--teacher", t1, "--teacher", t2, "--weight", "3", "--weight", "1",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv", "--extra", tmp_path / "extra.csv",
                "--out", tmp_path / "labels")
    assert r.exit_code == 0, r.output
    assert "in-sample predictions are usually sharper" in r.output and "teacher labels in" in r.output
    assert sorted(FakeFoldModel.calls) == [(t, k) for t in (1, 2) for k in (0, 1, 2)]  # each fold model once
    for k in (0, 1, 2):
        got = pd.read_csv(tmp_path / "labels" / f"fold_{k}.csv", dtype={"id": str})
        val_ids = set(folds.loc[folds["fold"] == k, "id"])
        train_ids = list(train["id"][~train["id"].isin(val_ids)])
        assert not val_ids & set(got["id"])  # fold K's validation rows are never labelled in its file
        assert list(got["id"]) == train_ids + list(extra["id"])
        # the mean of log-probabilities weighted 3:1, then a softmax, of the fold-K teachers only
        logit = 0.75 * np.log(fake_probs(1, k, got["id"])) + 0.25 * np.log(fake_probs(2, k, got["id"]))
        expected = np.exp(logit) / np.exp(logit).sum(1, keepdims=True)
        assert np.allclose(got[PROB].to_numpy(), expected, atol=1e-12)
        for j in {0, 1, 2} - {k}:  # another fold's teachers would have given other numbers
            other = 0.75 * np.log(fake_probs(1, j, got["id"])) + 0.25 * np.log(fake_probs(2, j, got["id"]))
            assert not np.allclose(got[PROB].to_numpy(), np.exp(other) / np.exp(other).sum(1, keepdims=True), atol=1e-3)
    manifest = json.loads((tmp_path / "labels" / "teacher_labels.json").read_text())
    assert manifest["weights"] == [0.75, 0.25] and len(manifest["per_fold"]) == 3
    # an existing output is kept without --force
    r = run_cli("distill-labels", "--teacher", t1, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--out", tmp_path / "labels")
    assert r.exit_code == 1 and "already exists; pass --force" in r.output


def test_distill_labels_refuses_a_teacher_that_trained_on_the_fold(tiny_project, tmp_path, monkeypatch):
    import kagglekit.predict
    from kagglekit.distill import teacher_labels

    monkeypatch.setattr(kagglekit.predict, "FoldModel", FakeFoldModel)
    folds, train = _folds(tiny_project), pd.read_csv(tiny_project / "train.csv", dtype={"id": str})
    bad = _fake_teacher(tmp_path, "teacher1", folds, train, skip_val_of=1)
    with pytest.raises(KKError, match=r"fold_1 did not validate on 1 of fold 1's validation rows .* same folds file"):
        teacher_labels([bad], tiny_project / "train.csv", tiny_project / "folds.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any work
    good = _fake_teacher(tmp_path, "teacher2", folds, train)
    with pytest.raises(KKError, match="one --weight per --teacher"):
        teacher_labels([good], tiny_project / "train.csv", tiny_project / "folds.csv", tmp_path / "out", weights=[1, 2])
    r = run_cli("distill-labels", "--teacher", good, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--extra", tiny_project / "train.csv", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "is also a train id" in r.output
    args = ["distill-labels", "--teacher", good, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv"]
    r = run_cli(*args, "--fold", "5", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "fold 5 is not in" in r.output
    r = run_cli(*args, "--fold", "1", "--out", tmp_path / "one")  # one fold, as the teachers' folds finish
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "one").glob("fold_*.csv")) == ["fold_1.csv"]


# --- data.extra: hard or soft, and never a train row or a validation prompt -----------------------------------------


def _extra_frame(project, fold_for_val=0):
    """Extra rows: 3 copies of train rows under their own ids, 2 copies of fold-0 validation rows re-spaced,
    upper-cased and A/B-swapped under new ids, 1 new row with a fold-0 validation prompt, 4 new rows."""
    train = pd.read_csv(project / "train.csv", dtype={"id": str})
    folds = _folds(project)
    val0 = train[train["id"].isin(folds.loc[folds["fold"] == fold_for_val, "id"])]
    fresh = pd.read_csv(project / "test.csv", dtype={"id": str}).head(5).assign(id=lambda d: "new" + d["id"])
    same_id = train[~train["id"].isin(val0["id"])].head(2)
    same_id = pd.concat([same_id, val0.head(1)])
    disguised = val0.iloc[1:3].copy()
    disguised["id"] = ["dup1", "dup2"]
    respace = lambda cell, f: json.dumps([f(t) if t else t for t in json.loads(cell)])  # noqa: E731
    disguised["response_a"] = [respace(c, str.upper) for c in val0.iloc[1:3]["response_b"]]
    disguised["response_b"] = list(val0.iloc[1:3]["response_a"])
    disguised["prompt"] = [respace(c, lambda t: "  " + t.replace(" ", " \t ") + " ") for c in val0.iloc[1:3]["prompt"]]
    turns = len(json.loads(val0["prompt"].iloc[3]))
    fresh.loc[fresh.index[0], ["prompt", "response_a", "response_b"]] = [
        val0["prompt"].iloc[3], json.dumps(["a new answer"] * turns), json.dumps(["another new answer"] * turns)]
    rows = pd.concat([same_id, disguised, fresh], ignore_index=True)[["id", "prompt", "response_a", "response_b"]]
    labels = pd.DataFrame(np.eye(3, dtype=int)[np.arange(len(rows)) % 3], columns=list(TASK.label_columns))
    return pd.concat([rows, labels], axis=1)


def test_extra_rows_that_are_train_rows_or_validation_prompts_are_dropped(tiny_project, tmp_path, monkeypatch):
    """Issue 24 item 7: extra rows whose ids, or whose prompt and responses, are train rows (fold 0's validation rows
    included) no longer train the fold silently; an extra row with a fold-0 validation prompt stays out of fold 0."""
    import kagglekit.ui
    from kagglekit.train import prepare_inputs

    warnings = []
    monkeypatch.setattr(kagglekit.ui, "warn", warnings.append)
    rows = _extra_frame(tiny_project)
    rows[["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "extra.csv", index=False)
    pd.DataFrame({"id": rows["id"], **dict(zip(PROB, [0.5, 0.3, 0.2]))}).to_csv(tmp_path / "soft.csv", index=False)
    cfg = tiny_config(tiny_project, f"data.extra=[{{path: {tmp_path / 'extra.csv'}, soft_labels: {tmp_path / 'soft.csv'}}}]")
    inputs = prepare_inputs(cfg, 0, _fmt(cfg))
    assert inputs.n_extra == 4, inputs.n_extra  # 10 rows: 3 same ids, 2 disguised copies, 1 fold-0 prompt dropped
    assert inputs.extra_dropped == {"id of a train row": 3, "same prompt+responses as a train row": 2,
                                    "prompt of a fold-0 validation row": 1}
    assert any("6 of 10 rows left out of fold 0's training" in w for w in warnings), warnings
    # the row with a fold-0 validation prompt does train fold 1 (the folds are grouped by prompt: not one of fold 1's)
    inputs = prepare_inputs(cfg, 1, _fmt(cfg))
    assert inputs.n_extra == 5 and inputs.extra_dropped == {"id of a train row": 3, "same prompt+responses as a train row": 2}


def test_hard_labelled_extra_rows_need_no_soft_labels(tiny_project, tmp_path):
    from kagglekit.train import prepare_inputs

    rows = _extra_frame(tiny_project).iloc[5:]  # the new rows only
    rows.to_csv(tmp_path / "extra.csv", index=False)
    cfg = tiny_config(tiny_project, f"data.extra=[{{path: {tmp_path / 'extra.csv'}}}]")
    inputs = prepare_inputs(cfg, 1, _fmt(cfg))
    n, m = len(inputs.train_df), inputs.n_extra
    assert m == 5 and np.isnan(inputs.targets).all()  # no teacher anywhere: the plain cross-entropy
    assert (inputs.labels[n : n + m] == rows[list(TASK.label_columns)].to_numpy().argmax(1)).all()
    rows[["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test_format.csv", index=False)
    cfg = tiny_config(tiny_project, f"data.extra=[{{path: {tmp_path / 'test_format.csv'}}}]")
    with pytest.raises(KKError, match=r"test_format.csv has no label columns .* and no soft_labels"):
        prepare_inputs(cfg, 1, _fmt(cfg))


def test_extra_rows_need_their_soft_labels(tiny_project, tmp_path):
    from kagglekit.train import train_fold

    extra = pd.read_csv(tiny_project / "test.csv", dtype=str).head(10).assign(id=lambda d: "x" + d["id"])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    soft = pd.DataFrame({"id": extra["id"].head(9), "winner_model_a": 0.5, "winner_model_b": 0.3, "winner_tie": 0.2})
    soft.to_csv(tmp_path / "soft.csv", index=False)
    cfg = tiny_config(tiny_project, "train.max_steps=1",
                      f"data.extra=[{{path: {tmp_path / 'extra.csv'}, soft_labels: {tmp_path / 'soft.csv'}}}]")
    with pytest.raises(KKError, match=r"soft.csv: no soft label for train id .* \(1 missing\)"):
        train_fold(cfg, 0, tmp_path / "run")
    soft = pd.concat([soft, soft.head(1).assign(id=extra["id"].iloc[9])])
    soft.to_csv(tmp_path / "soft.csv", index=False)
    m = train_fold(cfg, 0, tmp_path / "run")
    assert m["n_extra"] == 10
    saved = json.loads((tmp_path / "run/fold_0/metrics.json").read_text())
    assert saved["n_extra"] == 10 and saved["extra_dropped"] == {}


@pytest.mark.slow
def test_student_on_per_fold_teacher_labels_reaches_the_teacher(tmp_path):
    """The loop's learning: a student of fold 0 on the teacher's fold-0 labels (plus pseudo-labelled extra rows)
    learns the task as well as the teacher's fold 0 did, its validation rows never seen by any label source."""
    from kagglekit.config import load_config
    from kagglekit.data import load_train
    from kagglekit.distill import teacher_labels
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model
    from kagglekit.train import train_fold

    make_synthetic(600, seed=1).to_csv(tmp_path / "train.csv", index=False)
    make_synthetic(120, seed=5, with_labels=False).assign(id=lambda d: "x" + d["id"].astype(str)).to_csv(tmp_path / "extra.csv", index=False)
    make_folds(load_train(tmp_path / "train.csv")[0], 3, 42).to_csv(tmp_path / "folds.csv", index=False)
    build_tiny_model(tmp_path / "model", "deberta-v2", str(tmp_path / "train.csv"))
    base = [f"data.train={tmp_path / 'train.csv'}", f"data.folds={tmp_path / 'folds.csv'}", f"model.backbone={tmp_path / 'model'}"]

    def cfg(*extra):
        return load_config(REPO / "configs" / "tiny.yaml", [*base, *extra])

    teacher = {0: train_fold(cfg(), 0, tmp_path / "teacher")}  # fold 0's labels need the teacher's fold 0 only
    (row,) = teacher_labels([tmp_path / "teacher"], tmp_path / "train.csv", tmp_path / "folds.csv", tmp_path / "labels",
                            extra=[tmp_path / "extra.csv"], only_folds=[0])
    assert row["fold"] == 0 and row["extra"] == 120 and not (tmp_path / "labels" / "fold_1.csv").exists()
    soft = f"data.soft_labels={tmp_path}/labels/fold_{{fold}}.csv"
    student = train_fold(cfg(soft, "train.distill.weight=0.5", "train.distill.temperature=2"), 0, tmp_path / "student")
    assert student["val_log_loss"] < student["prior_log_loss"] - 0.1, student
    assert student["val_log_loss"] < teacher[0]["val_log_loss"] + 0.05, (student["val_log_loss"], teacher[0]["val_log_loss"])
    pseudo = train_fold(cfg(soft, "train.max_steps=5",
                            f"data.extra=[{{path: {tmp_path / 'extra.csv'}, soft_labels: '{tmp_path}/labels/fold_{{fold}}.csv'}}]"),
                        0, tmp_path / "pseudo")
    folds = _folds_of(tmp_path)
    assert pseudo["n_extra"] == 120 and pseudo["n_val"] == int((folds["fold"] == 0).sum())
    oof = pd.read_csv(tmp_path / "pseudo/fold_0/oof.csv", dtype={"id": str})
    assert set(oof["id"]) == set(folds.loc[folds["fold"] == 0, "id"])


def _folds_of(root):
    return pd.read_csv(root / "folds.csv", dtype={"id": str})


# --- the README's loop, end to end ----------------------------------------------------------------------------------


def readme_commands(section: str) -> list[list[str]]:
    """The `kk` commands of the first bash block under a README heading, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "kk", line
            commands.append(words[1:])
    return commands


def _arena_records(train, n_new=12, seed=0):
    """chatbot_arena_conversations records: new battles, plus one copy of a train row (to be deduplicated)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_new):
        q = f"question {i} about {rng.choice(['rivers', 'python', 'music'])}?"
        recs.append({"question_id": f"q{i}", "model_a": "m1", "model_b": "m2",
                     "winner": ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4],
                     "conversation_a": [{"role": "user", "content": q}, {"role": "assistant", "content": f"excellent answer {i}"}],
                     "conversation_b": [{"role": "user", "content": q}, {"role": "assistant", "content": f"unsure reply {i}"}]})
    row = train.iloc[0]
    recs.append({"question_id": "copy", "model_a": "m1", "model_b": "m2", "winner": "model_a",
                 "conversation_a": [m for p, a in zip(json.loads(row["prompt"]), json.loads(row["response_b"]))
                                    for m in ({"role": "user", "content": p}, {"role": "assistant", "content": a})],
                 "conversation_b": [m for p, a in zip(json.loads(row["prompt"]), json.loads(row["response_a"]))
                                    for m in ({"role": "user", "content": p}, {"role": "assistant", "content": a})]})
    return recs


@pytest.mark.slow
def test_the_readme_distillation_loop_runs_end_to_end(tmp_path, monkeypatch):
    """Every command of the README's distillation block, as written, on tiny models (backbones and sizes by --set)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "folds").mkdir()
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    train = make_synthetic(120, seed=21)
    train.to_csv("data/train.csv", index=False)
    make_synthetic(16, seed=22, with_labels=False).assign(id=lambda d: "t" + d["id"].astype(str)).to_csv("data/test.csv", index=False)
    make_folds(load_train("data/train.csv")[0], 2, 42).to_csv("folds/folds.csv", index=False)
    pq.write_table(pa.Table.from_pylist(_arena_records(train)), "data/arena_conversations.parquet")
    build_tiny_model(tmp_path / "gemma", "gemma2", "data/train.csv", vocab_size=400, hidden=32)
    build_tiny_model(tmp_path / "deberta", "deberta-v2", "data/train.csv", vocab_size=400, hidden=32)
    small = ["--set", "model.max_length=64", "--set", "train.epochs=1", "--set", "train.max_steps=2", "--set", "train.batch_size=16",
             "--set", "train.grad_accum=1", "--set", "train.eval_batch_size=64", "--set", "predict.batch_size=64"]
    overrides = {"configs/teacher.yaml": ["--set", f"model.backbone={tmp_path / 'gemma'}", "--set", "model.quantization=none",
                                          "--set", "model.gradient_checkpointing=false", *small],
                 "configs/student.yaml": ["--set", f"model.backbone={tmp_path / 'deberta'}", *small]}
    commands = readme_commands("Distillation and pseudo-labels")
    assert [c[0] for c in commands] == ["train", "data", "distill-labels", "train", "ensemble"], commands
    for cmd in commands:
        extra = overrides.get(cmd[cmd.index("--config") + 1], []) if "--config" in cmd else []
        r = run_cli(*cmd, *extra)
        assert r.exit_code == 0, (cmd, r.output)
    labels = {k: pd.read_csv(f"data/teacher_labels/fold_{k}.csv", dtype={"id": str}) for k in (0, 1)}
    folds = pd.read_csv("folds/folds.csv", dtype={"id": str})
    imported = pd.read_csv("data/train_extra.csv", dtype={"id": str})
    assert len(imported) == 12  # the copy of a train row was dropped on import
    for k in (0, 1):
        assert not set(folds.loc[folds["fold"] == k, "id"]) & set(labels[k]["id"])
        assert set(imported["id"]) <= set(labels[k]["id"])
        metrics = json.loads((tmp_path / "runs" / "student" / f"fold_{k}" / "metrics.json").read_text())
        assert metrics["n_extra"] == 12 and metrics["steps"] == 2
    # the teacher's fold-0 model itself gives fold 0's labels (the real inference path, swap TTA)
    from kagglekit.predict import FoldModel

    rows = load_train("data/train.csv")[0]
    rows = rows[rows["id"].isin(labels[0]["id"])].reset_index(drop=True)
    direct = FoldModel(tmp_path / "runs" / "teacher" / "fold_0").predict(rows, tta=True)["probs"]
    got = labels[0].set_index("id").loc[rows["id"], PROB].to_numpy()
    assert np.allclose(got, direct, atol=1e-6)
    assert (tmp_path / "submissions" / "submission.csv").exists()
