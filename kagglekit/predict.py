"""`kk predict` / `kk ensemble`'s test predictions: the passes on one device, each fold's cache, the Python API.

Test rows go through :mod:`kagglekit.passes`, as in the kernel: pass 1 in the given (A,B) order for every fold, then
the swapped (B,A) order on the rows swap TTA chooses (every row, or the run's least confident by its fold mean).
Each fold keeps what it predicted beside it, at each inference setting (``--set predict.max_length=8192``, ...):

- ``fold_K/test.npz``: the two passes ((A,B) of every row; (B,A) where it ran, NaN elsewhere), what a later call
  reuses (a later call that wants the (B,A) order on more rows predicts only the missing ones);
- ``fold_K/test.json``: what made them (the test file's sha256, the inference settings, the fold's generation: a
  retrained fold never reuses the old model's) and the sha256 of the two files it describes;
- ``fold_K/test.csv``: id + the task's probabilities after swap TTA, for reading.

At settings other than the fold's own they are ``test.<key>.*`` (the key a hash of the settings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import KKError
from .runs import Fold, file_sha256, fold_generation, open_fold, open_run


def inference_settings(cfg) -> dict:
    """The settings that change a fold's predictions beyond its weights: what the prediction cache tells apart."""
    m = cfg.inference_model()
    return {"max_length": m.max_length, "quantization": m.quantization, "precision": m.precision, "engine": cfg.predict.engine}


class FoldCache:
    """One fold's cached test predictions at one inference setting (see the module docstring)."""

    def __init__(self, fold, cfg, sha: str, test_path: Path):
        settings = inference_settings(cfg)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        stem = "test" if settings == inference_settings(fold.cfg) else f"test.{key}"
        self.fold, self.cfg, self.test_path, self.meta = fold, cfg, test_path, {}
        self.csv, self.json, self.npz = (fold.path / f"{stem}.{ext}" for ext in ("csv", "json", "npz"))
        self.key = {"sha256": sha, "inference": settings, "generation": fold.generation}

    def load(self, n: int):
        """(A,B) probabilities (n, C) and (B,A) probabilities (n, C; NaN rows where it did not run), or None."""
        from .ui import warn

        if not (self.json.exists() and self.npz.exists()):
            return None
        try:
            meta = json.loads(self.json.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            warn(f"{self.json} is corrupt ({e}); predicting again")
            return None
        if any(meta.get(k) != v for k, v in self.key.items()):
            return None
        self.meta = meta
        if meta.get("passes_sha256") != file_sha256(self.npz):
            warn(f"{self.npz} does not match {self.json}; predicting again")
            return None
        try:
            with np.load(self.npz, allow_pickle=False) as z:  # arrays only: nothing in it can run
                ab, ba = z["ab"].astype(np.float64), z["ba"].astype(np.float64)
        except (OSError, ValueError, KeyError) as e:
            warn(f"{self.npz} is damaged ({e}); predicting again")
            return None
        c = self.fold.task.n_classes
        done = np.isfinite(ba).all(axis=1)
        if ab.shape != (n, c) or ba.shape != (n, c) or not _probabilities(ab) or not _probabilities(ba[done]):
            warn(f"{self.npz} does not hold {n} rows of probabilities; predicting again")
            return None
        return ab, ba

    def save(self, ids, ab, ba, probs, tta, stats) -> None:
        """The passes, then the csv, then the json naming both: a kill in between is a cache miss, never a mispairing."""
        from .io import atomic_path, write_csv, write_json

        self.json.unlink(missing_ok=True)
        with atomic_path(self.npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, ab=ab, ba=ba)
        write_csv(self.csv, self.fold.task.prob_frame(ids, probs))
        write_json(self.json, {"test_file": str(self.test_path), **self.key, "tta": tta, "rows": len(ids),
                               "output_sha256": file_sha256(self.csv), "passes_sha256": file_sha256(self.npz),
                               "truncation": stats.summary()})


def _probabilities(p) -> bool:
    return bool(np.isfinite(p).all() and (p >= 0).all() and (np.abs(p.sum(axis=1) - 1) <= 1e-3).all())


def tta_label(mode: str, share: float):
    """How test.json names the swap TTA its csv holds."""
    return {"full": True, "none": False}.get(mode, f"uncertain:{share:g}")


def predict_runs(runs: list, test_df, test_path, tta=True, force: bool = False, backbone: str | None = None,
                 overrides: list[str] | None = None, device=None) -> list[list[np.ndarray]]:
    """Per run, per fold: test probabilities after swap TTA (``tta``: True, False or "uncertain"; None: each run's
    predict.tta), through the passes on one device with no time budget. Each fold's cache is reused where it holds
    what is asked (unless ``force``) and rewritten where it did not. ``overrides``: ``--set predict.*``."""
    from .io import check_writable, file_lock
    from .modeling import fold_base_weights
    from .passes import Budget, Job, Passes, RunPlan, make_units
    from .tta import tta_mode
    from .ui import progress

    test_path = Path(test_path)
    if not test_path.is_file():
        raise KKError(f"test file {test_path} does not exist" if not test_path.exists() else f"{test_path} is a folder, expected a file")
    sha, n = file_sha256(test_path), len(test_df)
    plans, caches = [], {}
    for r, run in enumerate(runs):
        cfg = run.folds[0].inference(overrides)  # a --set typo fails here, before any model loads
        jobs = [Job(r, f, f.name) for f in run.folds]
        plans.append(RunPlan(run.path.name, jobs, backbone or fold_base_weights(run.folds[0].path, cfg.inference_model()),
                             tta_mode(cfg.predict.tta if tta is None else tta), cfg.predict.tta_share))
        for j in jobs:
            caches[j] = FoldCache(j.fold, j.fold.inference(overrides), sha, test_path)
    with contextlib.ExitStack() as locks:
        for j in caches:
            check_writable(j.fold.path, f"fold {j.fold.index}")
            locks.enter_context(file_lock(j.fold.path / ".predict.lock", f"fold {j.fold.index} of {j.fold.run} (kk predict)"))
        hits = {j: None if force else c.load(n) for j, c in caches.items()}
        passes = Passes(make_units(plans, [device], n, overrides), [device], test_df, Budget.unlimited(), log=lambda m: None,
                        overrides=overrides)
        for j, hit in hits.items():
            if hit is not None:
                passes.known(j, hit[0])
        try:
            with progress() as bar:
                task = bar.add_task("predict (A,B)", total=n * sum(hit is None for hit in hits.values()))
                passes.on_rows = lambda k: bar.advance(task, k)
                passes.run_pass(1)
                wanted = passes.wanted(plans)
                for j, hit in hits.items():
                    if hit is not None:
                        rows = np.intersect1d(wanted[j.run], np.flatnonzero(np.isfinite(hit[1]).all(axis=1)))
                        passes.known2[j] = (rows, hit[1][rows])
                todo = sum(len(np.setdiff1d(wanted[j.run], passes.known2[j][0] if j in passes.known2 else [])) for j in caches)
                bar.update(task, description="predict (B,A)", total=todo, completed=0)
                passes.run_pass(2, wanted)
        finally:
            passes.free_all()
        first, second, out = passes.first_pass(), passes.second_pass(), passes.fold_probs(plans)
        for x, probs in zip(plans, out):
            for j, p in zip(x.jobs, probs):
                if not np.isfinite(p).all():
                    raise KKError(f"fold {j.fold.index} of {j.fold.run} predicted NaN probabilities for {test_path}")
                computed = hits[j] is None or any(k is j for k, _ in passes.parts2)
                if not computed and caches[j].meta.get("tta") == tta_label(x.mode, x.share):
                    continue  # served from the cache as it stands
                if computed:
                    # `kk train --force` swaps a retrained fold in by renaming folders: if that happened while this model
                    # predicted, these are the old model's probabilities and the folder is the new fold's.
                    _check_generation(j.fold)
                ba = np.full_like(first[j], np.nan) if hits[j] is None else hits[j][1].copy()
                if j in second:
                    ba[second[j][0]] = second[j][1]
                stats = passes.stats.get(j) or _stats(j.fold, caches[j].cfg, test_df, passes.cache)
                caches[j].save(test_df["id"].to_numpy(), first[j], ba, p, tta_label(x.mode, x.share), stats)
    return out


def _stats(fold, cfg, df, cache):
    """Truncation stats of a fold's (A,B) sequences when no model ran this time (from its tokenizer alone)."""
    from .formatting import Formatter
    from .modeling import load_tokenizer

    return cache.sequences(Formatter.from_config(load_tokenizer(str(fold.path)), cfg.inference_model()), df)[1]


def _check_generation(fold) -> None:
    try:
        now = fold_generation(fold.path)
    except (KKError, OSError):
        now = None  # mid-swap, or damaged: not the fold these predictions came from either
    if now != fold.generation:
        raise KKError(f"fold {fold.index} of {fold.run} was retrained while it predicted (its weights changed under it); its "
                      "predictions were not written: run kk predict again")


def predict_fold(run_dir, fold: int, test_path, tta: bool | str = True, batch_size: int | None = None, force: bool = False,
                 backbone: str | None = None, test_df=None, overrides: list[str] | None = None, threads: int | None = None):
    """Test probabilities of one fold as a frame ``id`` + the task's probability columns (``kk predict``).
    ``batch_size``/``threads``: predict.batch_size/threads for this prediction."""
    from .data import load_test

    run = open_run(run_dir, [fold])
    overrides = [*(overrides or []), *([f"predict.batch_size={batch_size}"] if batch_size else []),
                 *([f"predict.threads={threads}"] if threads else [])]
    run.folds[0].inference(overrides)  # a --set typo fails before the test file is read
    if test_df is None:
        if not Path(test_path).is_file():
            raise KKError(f"test file {test_path} does not exist" if not Path(test_path).exists()
                          else f"{test_path} is a folder, expected {run.task.test_file}")
        test_df, report = load_test(test_path, task=run.task)
        report.print_warnings()
    probs = predict_runs([run], test_df, test_path, tta, force, backbone, overrides or None)[0][0]
    return run.task.prob_frame(test_df["id"].to_numpy(), probs)


class FoldModel:
    """A trained fold loaded for inference: ``FoldModel(path).predict(df)["probs"]``. ``overrides``: ``predict.*``
    settings (``predict.max_length/quantization/precision`` replace the trained ``model.*`` values); ``threads``:
    torch's CPU threads (default: the fold's ``predict.threads``)."""

    def __init__(self, fold_path, backbone: str | None = None, device: str | None = None, overrides: list[str] | None = None,
                 threads: int | None = None):
        from .engine import open_engine

        self.fold = fold_path if isinstance(fold_path, Fold) else open_fold(fold_path)
        overrides = [*(overrides or []), *([f"predict.threads={threads}"] if threads else [])]
        self.engine = open_engine([self.fold], backbone, device, None, overrides or None)
        self.path, self.cfg, self.task = self.fold.path, self.engine.config(self.fold), self.engine.task
        self.formatter = self.engine.formatter(self.fold)

    model = property(lambda self: self.engine.model)
    device = property(lambda self: self.engine.device)
    dtype = property(lambda self: self.engine.dtype)
    tokenizer = property(lambda self: self.formatter.tokenizer)

    def predict(self, df, tta: bool | str = True, batch_size: int | None = None, progress=None, description: str = "predict",
                cache=None) -> dict:
        """``tta``: True, False or "uncertain" (the swapped order on the fold's predict.tta_share least confident
        rows); ``batch_size``: predict.batch_size for this call; ``progress``: a Rich progress to add a bar to; see
        :func:`kagglekit.inference.predict_tta`."""
        from .inference import predict_tta
        from .tta import second_pass_share

        on_rows = None
        if progress is not None:
            bar = progress.add_task(description, total=len(df) * (1 + second_pass_share(tta, self.cfg.predict.tta_share)))
            on_rows = lambda k: progress.advance(bar, k)  # noqa: E731
        cfgs = self.engine.cfgs
        if batch_size:
            cfgs[self.fold] = self.cfg.model_copy(update={"predict": self.cfg.predict.model_copy(update={"batch_size": batch_size})})
        try:
            return predict_tta(self.engine, self.fold, df, tta, cache, on_rows, description)
        finally:
            cfgs[self.fold] = self.cfg

    def release(self) -> None:
        """Free the model's memory now (the next fold can load into it); the object cannot predict afterwards."""
        self.engine.close()


class Predictor:
    """Fold models of one run, averaged, with swap TTA: the Python API for a single pair.

    >>> p = Predictor.from_run("runs/deberta-v3-base", folds="all")
    >>> p.predict_one("What is 2+2?", "4", "5")
    {'winner_model_a': 0.61, 'winner_model_b': 0.12, 'winner_tie': 0.27}

    ``from_run`` keeps no model in memory between calls: every ``predict_frame`` / ``predict_one`` loads, predicts
    with and frees one fold at a time, so K folds of an LLM never share the GPU. ``Predictor([FoldModel...])`` uses
    fold models the caller has loaded (and keeps them).
    """

    def __init__(self, fold_models: list, tta: bool = True, backbone: str | None = None):
        from .task import same_task

        if not fold_models:
            raise KKError("Predictor needs at least one trained fold")
        self.fold_models = fold_models  # FoldModel objects, or fold folders loaded one at a time
        self.tta, self.backbone = tta, backbone
        self.task = same_task([fm.task.name if isinstance(fm, FoldModel) else open_fold(fm).cfg.task for fm in fold_models], "folds")

    @classmethod
    def from_run(cls, run_dir, folds="all", tta: bool = True, backbone: str | None = None) -> Predictor:
        return cls([f.path for f in open_run(run_dir, folds).folds], tta, backbone)

    def predict_frame(self, df) -> np.ndarray:
        """Mean of the folds' probabilities for parsed rows."""
        probs = []
        for fold in self.fold_models:
            fm = fold if isinstance(fold, FoldModel) else FoldModel(fold, self.backbone)
            probs.append(fm.predict(df, self.tta)["probs"])
            if fm is not fold:
                fm.release()  # before the next fold loads
        return np.mean(probs, axis=0)

    def predict_one(self, prompt, response_a, response_b) -> dict:
        """``prompt``/``response_*``: a string or a list of turns."""
        import pandas as pd

        from .formatting import as_turns

        df = pd.DataFrame({"id": ["0"], "prompt": [as_turns(prompt)], "response_a": [as_turns(response_a)],
                           "response_b": [as_turns(response_b)]})
        if not (len(df["prompt"][0]) == len(df["response_a"][0]) == len(df["response_b"][0])):
            raise KKError("prompt, response_a and response_b must have the same number of turns")
        probs = self.predict_frame(df)[0]
        return {c: float(probs[j]) for j, c in enumerate(self.task.prob_columns)}
