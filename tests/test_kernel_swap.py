"""Issue 21.1 and issue 19 items 10 and 13: folds sharing a backbone load it once per device and switch
adapters (heads included); a fold model is freed on its own GPU before the next loads; model loads in the
kernel's GPU threads never overlap."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
from kernel_fakes import make_artifacts, make_fake_run, simulate_cuda

from conftest import predict_model
from kagglekit.data import load_test


@pytest.fixture(scope="module")
def fake_runs(tiny_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-runs")
    return {"llama": make_fake_run(tiny_project, root / "llama", (0, 1, 2, 3), "llama"),
            "deberta": make_fake_run(tiny_project, root / "deberta", (0, 1), "deberta")}


@pytest.fixture
def spy_loads(monkeypatch):
    """Every backbone load (transformers' from_pretrained of a sequence classifier), with its thread."""
    import transformers

    calls = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        alive = [c["model"]() is not None for c in calls]  # the models loaded before, still in memory?
        result = real(cls, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # (model, loading info) with output_loading_info
        calls.append({"thread": threading.get_ident(), "model": weakref.ref(model), "kwargs": kwargs, "alive_before": alive})
        return result

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("arch", ["llama", "deberta"])
def test_adapters_switched_on_one_base_equal_each_fold_alone(fake_runs, tiny_project, spy_loads, arch):
    """One base, every fold's adapter (LoRA + its saved heads: Llama's score, DeBERTa's pooler and
    classifier): each fold's probabilities equal loading that fold alone on its own base, in any switching
    order (to 1e-6; and to 1e-5 the merged single-fold model kk predict loads)."""
    import torch
    from peft import PeftModel

    from kagglekit.engine import HFEngine
    from kagglekit.formatting import Formatter
    from kagglekit.inference import predict_order
    from kagglekit.modeling import load_backbone, load_tokenizer
    from kagglekit.predict import FoldModel
    from kagglekit.runs import fold_config, open_fold

    df, _ = load_test(tiny_project / "test.csv")
    folds = sorted(fake_runs[arch].glob("fold_*"))[:3]
    alone = {}
    for f in folds:  # each fold alone: a fresh base + its adapter through peft directly
        cfg = fold_config(f)
        tok = load_tokenizer(str(f))
        model = PeftModel.from_pretrained(load_backbone(cfg.model, tok, torch.device("cpu")), str(f)).eval()
        res = predict_model(model, Formatter.from_config(tok, cfg.model), df, cfg, batch_size=16)
        alone[f] = (res["probs_ab"], res["probs_ba"])
    merged = FoldModel(folds[0]).predict(df, tta=False)["probs"]
    n_before = len(spy_loads)
    opened = {f: open_fold(f) for f in folds}
    group = HFEngine(list(opened.values()), device="cpu")
    assert len(spy_loads) == n_before + 1  # the base, once
    for i, f in enumerate([folds[-1], folds[0], folds[1], folds[-1]]):  # switch back and forth
        p_ab = predict_order(group, opened[f], df, swap=False)
        assert np.abs(p_ab - alone[f][0]).max() < 1e-6, f
        if i % 2:
            assert np.abs(predict_order(group, opened[f], df, swap=True) - alone[f][1]).max() < 1e-6, f
        if f == folds[0]:
            assert np.abs(p_ab - merged).max() < 1e-5
    # the folds really differ, so a head or adapter left from another fold could not pass
    assert np.abs(alone[folds[0]][0] - alone[folds[1]][0]).max() > 1e-3
    group.close()


def test_base_loaded_once_per_device(fake_runs, tiny_project, tmp_path, spy_loads):
    """4 folds of one backbone on two (CPU-simulated) GPU workers: two base loads, one per worker."""
    from kagglekit.kernel.offline import run_offline

    art = make_artifacts(tmp_path / "art", [("llama", fake_runs["llama"], tiny_project / "llama")])
    rep = run_offline(art, tiny_project / "test.csv", tmp_path / "work" / "submission.csv", devices=["cpu", "cpu"])
    assert rep["folds"] == 4 and len(spy_loads) == 2
    assert len({c["thread"] for c in spy_loads}) == 2  # one load in each worker thread


def test_previous_model_is_collected_before_the_next_loads(fake_runs, tiny_project, tmp_path, monkeypatch):
    """Two groups (two backbones) on one worker: when the second base loads, the first model is gone even
    though it holds a reference cycle (a merged peft model does, in a notebook: ``del`` alone leaves it
    in GPU memory until the cyclic GC happens to run, and the next fold loads beside it)."""
    import gc

    import transformers

    from kagglekit.kernel.offline import run_offline

    loads, alive_before = [], []
    real = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        alive_before.append([r() is not None for r in loads])
        result = real(cls, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # (model, loading info) with output_loading_info
        object.__setattr__(model, "_kk_test_cycle", [model])  # the cycle, made certain (not a submodule)
        loads.append(weakref.ref(model))
        return result

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    art = make_artifacts(tmp_path / "art", [("llama", fake_runs["llama"], tiny_project / "llama"),
                                            ("deberta", fake_runs["deberta"], tiny_project / "deberta")], only_folds=[0])
    gc.disable()  # only an explicit collection counts (the automatic one runs whenever it likes)
    try:
        run_offline(art, tiny_project / "test.csv", tmp_path / "work" / "submission.csv", devices=["cpu"], tta=False)
    finally:
        gc.enable()
    assert alive_before == [[], [False]]


def test_memory_is_freed_on_the_models_own_gpu_only(monkeypatch):
    """empty_cache runs inside torch.cuda.device(d) of the model's GPU(s), never on another one."""
    import gc

    from kagglekit.memory import free_memory as release

    seen = simulate_cuda(monkeypatch)
    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    release("cuda:1")
    assert seen["empty_cache"] == [1] and collected
    seen["empty_cache"].clear()
    release("cuda:0", {"model.embed": 0, "model.layers.0": 0, "model.layers.1": 1, "score": 1})
    assert seen["empty_cache"] == [0, 1]
    seen["empty_cache"].clear()
    release("cpu")
    assert seen["empty_cache"] == []


def test_model_loads_never_overlap(fake_runs, tiny_project, tmp_path, monkeypatch):
    """Two worker threads, two groups of different precision: a slow loader shows the loads one after
    another (transformers sets torch's process-wide default dtype while it builds a model)."""
    import transformers

    from kagglekit.kernel.offline import run_offline

    spans = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def slow(cls, *args, **kwargs):
        start = time.monotonic()
        time.sleep(0.4)
        model = real(cls, *args, **kwargs)
        spans.append((start, time.monotonic(), threading.get_ident()))
        return model

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(slow))
    art = make_artifacts(tmp_path / "art", [("llama", fake_runs["llama"], tiny_project / "llama"),
                                            ("deberta", fake_runs["deberta"], tiny_project / "deberta")])
    run_offline(art, tiny_project / "test.csv", tmp_path / "work" / "submission.csv", devices=["cpu", "cpu"], tta=False)
    spans.sort()
    assert len({t for _, _, t in spans}) == 2 and len(spans) >= 2
    assert all(a_end <= b_start for (_, a_end, _), (b_start, _, _) in zip(spans, spans[1:])), spans
