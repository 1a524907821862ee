"""Issue 21.3: a time budget that always leaves a submission. The (A,B) pass of every fold first and a
complete submission at its end; the (B,A) pass only as far as the budget allows (the least confident rows
first), replacing the submission only when complete; ``predict.tta: uncertain`` on exactly the chosen rows;
kk_passes.json says what ran. The passes are driven by a fake clock and fake models (their cost is what
the clock says), the uncertain rows and the dry run by real tiny models."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
from kernel_fakes import make_artifacts, make_fake_run, simulate_cuda

from kagglekit.data import load_test
from kagglekit.task import LMSYS
from kagglekit.tta import uncertain_rows


class Clock:
    """Wall time of GPUs working in parallel: each worker thread keeps its own time from when the main
    thread last looked; the main thread sees the latest of them (the pass ends with its slowest GPU)."""

    def __init__(self):
        self.main, self.ends, self.local = 0.0, [0.0], threading.local()

    def __call__(self):
        if threading.current_thread() is threading.main_thread():
            self.main = max(self.main, *self.ends)
            return self.main
        if not hasattr(self.local, "t"):
            self.local.t = self.main
        return self.local.t

    def advance(self, seconds):
        if threading.current_thread() is threading.main_thread():
            self.main = self() + seconds
        else:
            self.local.t = self() + seconds
            self.ends.append(self.local.t)


class FakeFormatter:
    """Turns row i of a frame into the 'token sequence' [i, swap]: the fake engine reads which rows it predicts."""

    def __init__(self, name):
        self.name = name

    def signature(self):
        return self.name

    def encode_rows(self, df):
        return len(df)

    def sequences(self, n, swap=False):
        return [np.array([i, int(swap)]) for i in range(n)], None


class FakeGroup:
    """A loaded engine whose predictions are fixed per fold and whose cost is ``seconds_per_row`` of the
    fake clock (x ``slow2`` in the second pass)."""

    task = LMSYS

    def __init__(self, unit, clock, truth, seconds_per_row, calls, slow2=1.0, release=None):
        self.unit, self.clock, self.truth, self.spr, self.calls, self.slow2, self._release = unit, clock, truth, seconds_per_row, calls, slow2, release
        self.active = None

    def config(self, fold):
        return fold.cfg

    def formatter(self, fold):
        return FakeFormatter(fold.name)

    def use(self, fold):
        self.active = fold

    def logits(self, seqs, segs=None, on_rows=None):
        rows, swap = np.array([s[0] for s in seqs]), bool(seqs[0][1])
        start = self.clock()
        for i in range(0, len(rows), 8):  # batches of 8 rows, reported as inference reports them
            self.clock.advance(min(8, len(rows) - i) * self.spr * (self.slow2 if swap else 1.0))
            on_rows(min(8, len(rows) - i))
        fold = self.active
        self.calls.append({"fold": fold.path.name, "run": fold.run.name, "swap": swap, "rows": rows, "device": self.unit.device,
                           "thread": threading.current_thread().name, "start": start, "end": self.clock()})
        p_ab, p_ba = self.truth[(fold.run.name, fold.path.name)]
        return np.log(LMSYS.swap_probs(p_ba[rows]) if swap else p_ab[rows])  # the core maps a (B,A) prediction back

    def close(self):
        if self._release is not None:
            self._release(self.unit.device)


@pytest.fixture(scope="module")
def fake_kernel(tiny_project, tmp_path_factory):
    """Artifacts of a 3-fold run (real fold folders: their configs decide TTA and grouping), and per fold
    fixed (A,B) and mapped-back (B,A) probabilities for the fake models."""
    root = tmp_path_factory.mktemp("budget")
    run = make_fake_run(tiny_project, root / "runs" / "r", (0, 1, 2), "llama")
    art = make_artifacts(root / "art", [("r", run, tiny_project / "llama")])
    deb = make_fake_run(tiny_project, root / "runs" / "d", (0, 1), "deberta")
    two = make_artifacts(root / "art2", [("r", run, tiny_project / "llama"), ("d", deb, tiny_project / "deberta")],
                         weights=None)
    n = len(load_test(tiny_project / "test.csv")[0])
    rng = np.random.default_rng(0)
    truth = {(r, f"fold_{k}"): (rng.dirichlet([1, 1, 1], n), rng.dirichlet([1, 1, 1], n)) for r in "rd" for k in range(3)}
    return {"art": art, "two_groups": two, "truth": truth, "n": n, "test": tiny_project / "test.csv", "run": run}


def _run(fake_kernel, tmp_path, budget_s, seconds_per_row=1.0, slow2=1.0, devices=("cuda:0", "cuda:1"), tta=None,
         monkeypatch=None, release=None, art=None):
    from kagglekit import ensemble
    from kagglekit.kernel.offline import run_offline

    clock, calls, written = Clock(), [], []
    real_write = ensemble.write_submission

    def spy_write(ids, probs, out, **kw):
        written.append(np.array(probs))
        return real_write(ids, probs, out, **kw)

    monkeypatch.setattr(ensemble, "write_submission", spy_write)
    out = tmp_path / "working" / "submission.csv"
    rep = run_offline(art or fake_kernel["art"], fake_kernel["test"], out, devices=list(devices), clock=clock,
                      budget_h=budget_s / 3600, tta=tta,
                      group_factory=lambda unit: FakeGroup(unit, clock, fake_kernel["truth"], seconds_per_row, calls, slow2, release))
    log = json.loads((tmp_path / "working" / "kk_passes.json").read_text())
    return rep, log, calls, written, pd.read_csv(out, dtype={"id": str})


def _ensemble(fake_kernel, folds=(0, 1, 2), rows2=None):
    """What the submission must hold: the fold mean of (A,B), TTA-averaged on ``rows2`` (all: None)."""
    from kagglekit.ensemble import finalize_probs

    out = []
    for k in folds:
        p_ab, p_ba = fake_kernel["truth"][("r", f"fold_{k}")]
        p = p_ab.copy()
        if rows2 is not None:
            p[rows2] = (p_ab[rows2] + p_ba[rows2]) / 2
        out.append(p)
    return finalize_probs(np.mean(out, axis=0))


def test_one_order_submission_first_then_the_swapped_pass(fake_kernel, tmp_path, monkeypatch):
    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=8 * 3600, monkeypatch=monkeypatch)
    n = fake_kernel["n"]
    assert [p["status"] for p in log["passes"]] == ["done", "done"] and log["submission_from"] == "pass 2"
    assert len(written) == 2  # the complete one-order submission first, then the TTA one
    assert np.allclose(written[0], _ensemble(fake_kernel), atol=1e-12)
    assert np.allclose(written[1], _ensemble(fake_kernel, rows2=np.arange(n)), atol=1e-12)
    # every row of every fold predicted exactly once per order, the rows dealt between the two GPUs
    for swap in (False, True):
        for k in range(3):
            rows = np.concatenate([c["rows"] for c in calls if c["fold"] == f"fold_{k}" and c["swap"] == swap])
            assert sorted(rows.tolist()) == list(range(n))
    assert {c["device"] for c in calls} == {"cuda:0", "cuda:1"}
    assert any(e["event"] == "measured" for e in log["events"])  # its own rows/s on the first batches
    assert rep["passes"] == 6 and rep["submission_from"] == "pass 2"
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), written[1], atol=1e-9)


def test_budget_too_small_for_tta_keeps_the_one_order_submission(fake_kernel, tmp_path, monkeypatch):
    """Pass 1 takes 60 s a GPU (3 folds x 20 rows x 1 s); the budget leaves no time for pass 2."""
    from kagglekit.passes import WRITE_RESERVE_S

    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=60 + WRITE_RESERVE_S + 0.5, monkeypatch=monkeypatch)
    assert log["passes"][1]["status"] == "skipped" and "SKIPPED" in log["passes"][1]["decision"]
    assert log["submission_from"] == "pass 1" and rep["submission_from"] == "pass 1"
    assert not [c for c in calls if c["swap"]] and len(written) == 1
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), _ensemble(fake_kernel), atol=1e-9)


def test_a_budget_for_half_the_swapped_pass_runs_it_on_the_least_confident_rows(fake_kernel, tmp_path, monkeypatch):
    from kagglekit.passes import WRITE_RESERVE_S

    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=60 + WRITE_RESERVE_S + 30, monkeypatch=monkeypatch)
    assert log["passes"][1]["status"] == "done" and log["passes"][1]["decision"].startswith("CUT")
    rows2 = {k: np.sort(np.concatenate([c["rows"] for c in calls if c["swap"] and c["fold"] == f"fold_{k}"])) for k in range(3)}
    mean_ab = np.mean([fake_kernel["truth"][("r", f"fold_{k}")][0] for k in range(3)], axis=0)
    chosen = rows2[0]
    assert all(np.array_equal(r, chosen) for r in rows2.values())
    assert 0.3 * fake_kernel["n"] <= len(chosen) <= 0.5 * fake_kernel["n"]
    assert np.array_equal(chosen, uncertain_rows(mean_ab, len(chosen) / fake_kernel["n"]))  # the least confident
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), _ensemble(fake_kernel, rows2=chosen), atol=1e-9)


def test_a_second_pass_slower_than_measured_stops_and_the_first_submission_stays(fake_kernel, tmp_path, monkeypatch):
    from kagglekit.passes import WRITE_RESERVE_S

    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=60 + WRITE_RESERVE_S + 65, slow2=5.0,
                                         monkeypatch=monkeypatch)
    assert log["passes"][1]["status"] == "stopped" and log["submission_from"] == "pass 1"
    assert len(written) == 1 and np.allclose(sub.iloc[:, 1:].to_numpy(), _ensemble(fake_kernel), atol=1e-9)


def test_folds_that_would_cross_kaggles_limit_are_dropped_never_a_runs_first(fake_kernel, tmp_path, monkeypatch):
    """Each fold takes 3 h a GPU: fold 2 would end past 9 h less the margin: skipped, the submission holds
    folds 0 and 1, and pass 2 has no time left in a 6.1 h budget."""
    spr = 3 * 3600 / (fake_kernel["n"] / 2)
    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=6.1 * 3600, seconds_per_row=spr, monkeypatch=monkeypatch)
    assert log["passes"][0]["skipped_folds"] == ["r/fold_2"] and log["passes"][0]["folds"] == 2
    assert log["passes"][1]["status"] == "skipped"
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), _ensemble(fake_kernel, folds=(0, 1)), atol=1e-9)


def test_each_gpu_works_alone_and_frees_memory_on_its_own_device(fake_kernel, tmp_path, monkeypatch):
    """Two GPU threads, two groups (two backbones) on each: each thread works on its own GPU only; when it
    releases one group's model for the next, empty_cache runs on its own GPU."""
    from kagglekit.memory import free_memory as release

    seen = simulate_cuda(monkeypatch)
    rep, log, calls, written, sub = _run(fake_kernel, tmp_path, budget_s=8 * 3600, monkeypatch=monkeypatch, release=release,
                                         art=fake_kernel["two_groups"])
    by_thread = {}
    for c in calls:
        by_thread.setdefault(c["thread"], set()).add(c["device"])
    assert by_thread == {"kk-worker-0": {"cuda:0"}, "kk-worker-1": {"cuda:1"}}  # one thread per GPU, each its own
    worker_frees = [(t, i) for t, i in seen["empty_cache_threads"] if t.startswith("kk-worker-")]
    assert {t for t, _ in worker_frees} == {"kk-worker-0", "kk-worker-1"}
    assert all(int(t[-1]) == i for t, i in worker_frees), worker_frees


def test_uncertain_runs_the_second_pass_on_exactly_the_chosen_rows(fake_kernel, tiny_project, tmp_path, monkeypatch):
    """Real tiny models: with tta uncertain (share 0.3), pass 2 runs on exactly the 30% rows with the lowest
    top probability of the run's pass-1 mean, and the submission is TTA-averaged there only."""
    from kagglekit import passes
    from kagglekit.ensemble import finalize_probs
    from kagglekit.kernel.offline import run_offline

    seen = []
    real = passes.predict_order

    def spy(engine, fold, df, swap=False, rows=None, *a):
        p = real(engine, fold, df, swap, rows, *a)
        seen.append((fold.path.name, swap, np.arange(len(df)) if rows is None else np.asarray(rows), p))
        return p

    monkeypatch.setattr(passes, "predict_order", spy)
    out = tmp_path / "working" / "submission.csv"
    run_offline(fake_kernel["art"], fake_kernel["test"], out, devices=["cpu", "cpu"], tta="uncertain")
    n = fake_kernel["n"]
    first = {}
    for fold, swap, rows, p in seen:
        if not swap:
            first.setdefault(fold, np.zeros((n, 3)))[rows] = p
    chosen = uncertain_rows(np.mean(list(first.values()), axis=0), 0.3)
    assert len(chosen) == int(np.ceil(0.3 * n))
    second = {}
    for fold, swap, rows, p in seen:
        if swap:
            second.setdefault(fold, []).append((rows, p))
    assert set(second) == set(first)
    merged = []
    for fold, parts in second.items():
        rows = np.concatenate([r for r, _ in parts])
        assert np.array_equal(np.sort(rows), chosen), fold  # exactly the chosen rows, each once
        p = first[fold].copy()
        for r, pb in parts:
            p[r] = (p[r] + pb) / 2
        merged.append(p)
    sub = pd.read_csv(out, dtype={"id": str})
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), finalize_probs(np.mean(merged, axis=0)), atol=1e-9)
    log = json.loads((tmp_path / "working" / "kk_passes.json").read_text())
    assert log["runs"][0]["tta"] == "uncertain" and log["passes"][1]["rows"] == {"r": len(chosen)}


def test_dry_run_with_a_budget_too_small_for_tta(tiny_project, tmp_path, monkeypatch):
    """End to end: the notebook, run offline with a budget that leaves no time for TTA, writes the
    one-order submission, says so, and the dry run leaves no kk-dry-run-* folder behind."""
    import tempfile

    from kagglekit.ensemble import finalize_probs
    from kagglekit.kernel import build_kernel, dry_run
    from kagglekit.predict import FoldModel

    run = make_fake_run(tiny_project, tmp_path / "runs" / "dry", (0, 1), "llama")
    kernel = build_kernel([run], "budget-dry", tmp_path / "kernel", user="alice", fit=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    res = dry_run(kernel, tiny_project / "test.csv", time_budget_h=1e-6)
    assert res["submission_from"] == "pass 1"
    status = {p["pass"]: p for p in res["passes_log"]["passes"]}
    assert status[1]["status"] == "done" and status[2]["status"] == "skipped" and "SKIPPED" in status[2]["decision"]
    df, _ = load_test(tiny_project / "test.csv")
    expected = finalize_probs(np.mean([FoldModel(f).predict(df, tta=False)["probs"] for f in sorted(run.glob("fold_*"))], axis=0))
    sub = pd.read_csv(res["submission"], dtype={"id": str})
    assert np.allclose(sub.iloc[:, 1:].to_numpy(), expected, atol=1e-6)
    assert not list((tmp_path / "tmp").glob("kk-dry-run-*"))
    assert (kernel / "dry-run" / "executed.ipynb").exists() and (kernel / "dry-run" / "kk_passes.json").exists()
