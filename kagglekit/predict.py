"""`kk predict`: one fold's test probabilities, with swap TTA and length-sorted batches.

Each fold writes ``fold_K/test.csv`` (id + the task's class probabilities) and
``fold_K/test.json`` (which test file, by sha256, whether TTA was on, the inference settings), so that
ensembling never re-runs a model that already predicted the same file. Inference settings other than
the fold's own (``--set predict.max_length=8192``, ``predict.quantization=8bit``...) are cached beside
them as ``fold_K/test.<key>.csv/.json``, so predictions at several settings coexist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import KKError
from .task import get_task, same_task


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trained_folds(run_dir: str | os.PathLike, folds: str | list[int] | None = "all") -> list[tuple[int, Path]]:
    """(fold, folder) of every finished fold of a run (or of the ``folds`` asked for)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KKError(f"run folder {run_dir} does not exist (train a fold first: kk train --fold 0)")
    found = {}
    for d in run_dir.glob("fold_*"):
        try:
            k = int(d.name.split("_", 1)[1])
        except ValueError:
            continue
        if (d / "metrics.json").exists():
            found[k] = d
    if folds in (None, "all"):
        if not found:
            raise KKError(f"{run_dir} has no trained fold (no fold_*/metrics.json)")
        return sorted(found.items())
    wanted = parse_fold_list(folds)
    missing = [k for k in wanted if k not in found]
    if missing:
        raise KKError(f"fold {missing[0]} of {run_dir} is not trained (trained: {', '.join(map(str, sorted(found))) or 'none'})")
    return [(k, found[k]) for k in wanted]


def warn_missing_folds(run_dir, trained: list[int]) -> list[int]:
    """Warn, naming them, about folds of the run's folds file that have no trained model: an ensemble
    of 3 of 5 folds is legitimate but should never happen by accident. Returns the missing folds."""
    from .ui import warn

    expected = set(range(max(trained) + 1)) if trained else set()
    try:
        import pandas as pd

        cfg = fold_config(Path(run_dir) / f"fold_{trained[0]}")
        expected |= {int(f) for f in pd.read_csv(cfg.data.folds, usecols=["fold"])["fold"].unique()}
    except (KKError, OSError, ValueError, KeyError, IndexError):
        pass  # the folds file moved or is unreadable: judge by the fold numbers alone
    missing = sorted(expected - set(trained))
    if missing:
        warn(f"{run_dir}: fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} not trained; "
             f"using {len(trained)} fold(s): {', '.join(map(str, trained))}")
    return missing


def parse_fold_list(folds) -> list[int]:
    if isinstance(folds, (list, tuple)):
        return [int(f) for f in folds]
    try:
        return [int(f) for f in str(folds).split(",") if f.strip() != ""]
    except ValueError:
        raise KKError(f"--folds must be 'all' or a list like 0,2,4 (got {folds!r})") from None


def fold_config(fold_path: Path):
    from .config import config_from_dict, read_yaml

    return config_from_dict(read_yaml(fold_path / "config.yaml"), str(fold_path / "config.yaml"))


def inference_config(fold_path: Path, overrides: list[str] | None = None):
    """A fold's config with ``--set predict.*`` overrides (others refused); its config.yaml stays as trained."""
    from .config import apply_predict_overrides

    return apply_predict_overrides(fold_config(Path(fold_path)), overrides)


def inference_settings(cfg) -> dict:
    """The settings that change a fold's predictions beyond its weights: what the prediction cache tells apart."""
    m = cfg.inference_model()
    return {"max_length": m.max_length, "quantization": m.quantization, "precision": m.precision}


class FoldModel:
    """A trained fold loaded for inference: model, tokenizer, formatter, device. ``overrides``: ``predict.*``
    settings (``predict.max_length/quantization/precision`` replace the trained ``model.*`` values)."""

    def __init__(self, fold_path: Path, backbone: str | None = None, precision: str | None = None, device: str | None = None,
                 overrides: list[str] | None = None):
        from .formatting import Formatter
        from .modeling import device_and_dtype, load_trained, quiet_libraries

        quiet_libraries()
        self.path = Path(fold_path)
        self.cfg = inference_config(self.path, overrides)
        self.task = get_task(self.cfg.task)
        model_cfg = self.cfg.inference_model()
        self.device, self.dtype = device_and_dtype(precision or model_cfg.precision, device)
        self.model, self.tokenizer = load_trained(self.path, self.cfg.model_copy(update={"model": model_cfg}), self.device,
                                                  self.dtype, backbone)
        # The truncation rules apply at the inference length.
        self.formatter = Formatter.from_config(self.tokenizer, model_cfg)

    def predict(self, df, tta: bool | str = True, batch_size: int | None = None, progress=None, description="predict",
                cache: dict | None = None) -> dict:
        """``tta``: True, False or "uncertain" (the swapped order on the fold's predict.tta_share least
        confident rows, kagglekit.tta)."""
        from .inference import predict_pairs

        return predict_pairs(self.model, self.formatter, df, batch_size or self.cfg.predict.batch_size, tta,
                             self.device, self.dtype, progress, description, cache=cache,
                             max_tokens=self.cfg.predict.max_tokens, tta_share=self.cfg.predict.tta_share, task=self.task)


def predict_fold(run_dir, fold: int, test_path, tta: bool | str = True, batch_size: int | None = None, force: bool = False,
                 backbone: str | None = None, test_df=None, overrides: list[str] | None = None):
    """Test probabilities of one fold as a frame ``id`` + the task's probability columns
    (``winner_model_a, winner_model_b, winner_tie`` for LMSYS).

    Reuses the cached prediction when it was made from the same test file with the same TTA and
    inference settings (unless ``force``). ``overrides``: ``--set predict.*`` for this prediction only.
    """
    import pandas as pd

    from .data import load_test
    from .io import check_writable, file_lock, write_csv, write_json
    from .ui import progress

    (k, path), = trained_folds(run_dir, [fold])
    task = get_task(fold_config(path).task)
    if not Path(test_path).is_file():
        raise KKError(f"test file {test_path} does not exist" if not Path(test_path).exists()
                      else f"{test_path} is a folder, expected {task.test_file}")
    sha = file_sha256(test_path)
    cfg = inference_config(path, overrides)  # a --set typo fails here, before any model loads
    if tta == "uncertain":  # the cache must tell the share apart too
        tta = f"uncertain:{cfg.predict.tta_share:g}"
    out_path, meta_path = cache_paths(path, cfg)
    expected = cache_key(sha, tta, cfg)
    if not force:
        cached = _cached_prediction(out_path, meta_path, expected)
        if cached is not None:
            return cached
    check_writable(path, f"fold {k}")
    with file_lock(path / ".predict.lock", f"fold {k} of {run_dir} (kk predict)"):
        if test_df is None:
            test_df, report = load_test(test_path, task=task)
            report.print_warnings()
        fm = FoldModel(path, backbone, overrides=overrides)
        with progress() as bar:
            res = fm.predict(test_df, "uncertain" if str(tta).startswith("uncertain") else tta, batch_size, bar, f"fold {k}")
        probs = res["probs"]
        if not np.isfinite(probs).all():
            raise KKError(f"fold {k} of {run_dir} predicted NaN probabilities for {test_path}")
        out = pd.DataFrame({"id": test_df["id"].to_numpy(), **{c: probs[:, j] for j, c in enumerate(task.prob_columns)}})
        # The pair test.csv + test.json is replaced file by file; test.json names the sha256 of the
        # test.csv it belongs to, so a kill between the two renames is a cache miss, never a wrong pairing.
        meta_path.unlink(missing_ok=True)
        write_csv(out_path, out)
        write_json(meta_path, {"test_file": str(test_path), **expected, "rows": len(out),
                               "output_sha256": file_sha256(out_path), "truncation": res["stats"].summary()})
    return out


def cache_key(sha: str, tta: bool | str, cfg) -> dict:
    """What a cached prediction must have been made with to be reused (all of it is written to its test.json)."""
    return {"sha256": sha, "tta": tta, "inference": inference_settings(cfg)}


def cache_paths(fold_path: Path, cfg) -> tuple[Path, Path]:
    """(csv, json) of the prediction cache for these inference settings: ``test.csv/.json`` at the fold's own
    (its config.yaml's), ``test.<key>.csv/.json`` at others (the key a hash of the settings), so both can be kept."""
    settings = inference_settings(cfg)
    if settings == inference_settings(fold_config(fold_path)):
        return fold_path / "test.csv", fold_path / "test.json"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return fold_path / f"test.{key}.csv", fold_path / f"test.{key}.json"


def _cached_prediction(out_path: Path, meta_path: Path, expected: dict):
    """The cached fold prediction when its test.json matches every entry of ``expected`` (:func:`cache_key`), else None."""
    import pandas as pd

    from .ui import warn

    if not (out_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        warn(f"{meta_path} is corrupt ({e}); predicting again")
        return None
    if any(meta.get(k) != v for k, v in expected.items()):
        return None
    if meta.get("output_sha256") != file_sha256(out_path):
        warn(f"{out_path} does not match {meta_path}; predicting again")
        return None
    try:
        return pd.read_csv(out_path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None


class Predictor:
    """Fold models of one run, averaged, with swap TTA: the Python API for a single pair.

    >>> p = Predictor.from_run("runs/deberta-v3-base", folds="all")
    >>> p.predict_one("What is 2+2?", "4", "5")
    {'winner_model_a': 0.61, 'winner_model_b': 0.12, 'winner_tie': 0.27}
    """

    def __init__(self, fold_models: list[FoldModel], tta: bool = True):
        if not fold_models:
            raise KKError("Predictor needs at least one trained fold")
        self.fold_models = fold_models
        self.tta = tta
        self.task = same_task([fm.task for fm in fold_models], "folds")

    @classmethod
    def from_run(cls, run_dir, folds="all", tta: bool = True, backbone: str | None = None) -> Predictor:
        return cls([FoldModel(p, backbone) for _, p in trained_folds(run_dir, folds)], tta)

    def predict_frame(self, df) -> np.ndarray:
        """Mean of the folds' probabilities for parsed rows."""
        return np.mean([fm.predict(df, self.tta)["probs"] for fm in self.fold_models], axis=0)

    def predict_one(self, prompt, response_a, response_b) -> dict:
        """``prompt``/``response_*``: a string or a list of turns."""
        import pandas as pd

        from .formatting import _as_turns

        df = pd.DataFrame({"id": ["0"], "prompt": [_as_turns(prompt)], "response_a": [_as_turns(response_a)],
                           "response_b": [_as_turns(response_b)]})
        if not (len(df["prompt"][0]) == len(df["response_a"][0]) == len(df["response_b"][0])):
            raise KKError("prompt, response_a and response_b must have the same number of turns")
        probs = self.predict_frame(df)[0]
        return {c: float(probs[j]) for j, c in enumerate(self.task.prob_columns)}
