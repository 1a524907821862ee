"""Cross-validation folds: stratified by label (optionally by language too), grouped by prompt.

The arena data repeats prompts (the same question put to many model pairs). A
split that puts one prompt in two folds leaks, so rows are grouped by their exact
prompt turns and scikit-learn's ``StratifiedGroupKFold`` keeps class shares even.
A multilingual competition (WSDM) can also keep each language's share even:
the strata are then (label, language) pairs, languages too rare to be spread over
the folds pooled as one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .data import check_unique_header
from .errors import KKError
from .io import protect_existing, write_csv
from .task import LMSYS, Task


def prompt_groups(df: pd.DataFrame) -> np.ndarray:
    """An integer group per distinct prompt (all turns, exact text)."""
    keys = [json.dumps(p, ensure_ascii=False) for p in df["prompt"]]
    return pd.factorize(pd.Series(keys))[0]


def strata(df: pd.DataFrame, k: int, language: str | None = None) -> np.ndarray:
    """What the folds keep even: the label, or with ``language`` the (label, language) pair. A pair
    with fewer than ``k`` rows cannot be spread over k folds; such pairs share one stratum per label."""
    y = df["label"].to_numpy()
    if language is None:
        return y
    if language not in df.columns:
        raise KKError(f"stratifying by language needs a {language} column in the train file")
    label = pd.Series(y).astype(str).to_numpy()
    pair = pd.Series(label + "|" + df[language].astype(str).to_numpy())
    pair = pair.where(pair.map(pair.value_counts()) >= k, pd.Series(label + "|(rare)"))
    return pd.factorize(pair)[0]


def make_folds(df: pd.DataFrame, k: int = 5, seed: int = 42, stratify_language: str | None = None) -> pd.DataFrame:
    """``id, fold`` for every row of ``df`` (a frame from :func:`kagglekit.data.load_train`).
    ``stratify_language``: a column (``language``) whose shares the folds keep even as well."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise KKError(f"k must be at least 2 (got {k})")
    groups = prompt_groups(df)
    n_groups = int(groups.max()) + 1
    if k > n_groups:
        raise KKError(f"k={k} is larger than the number of distinct prompts ({n_groups})")
    fold = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        if stratify_language:  # pooled rare languages can still be below k rows: expected, not news
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for f, (_, val_idx) in enumerate(splitter.split(np.zeros(len(df)), strata(df, k, stratify_language), groups)):
            fold[val_idx] = f
    assert (fold >= 0).all()
    return pd.DataFrame({"id": df["id"].to_numpy(), "fold": fold})


def fold_summary(df: pd.DataFrame, folds: pd.DataFrame, task: Task = LMSYS) -> pd.DataFrame:
    """Rows, prompt groups and class shares per fold (and overall); with the task's language column,
    the number of languages and the share of the most common one."""
    lang = task.language_column if task.language_column in df.columns else None
    merged = df[["id", "label", *([lang] if lang else [])]].merge(folds, on="id")
    merged["group"] = prompt_groups(df.set_index("id").loc[merged["id"]].reset_index())
    rows = []
    for f, part in list(merged.groupby("fold")) + [("all", merged)]:
        shares = part["label"].value_counts(normalize=True)
        rows.append({"fold": f, "rows": len(part), "prompts": part["group"].nunique(),
                     **{name: float(shares.get(i, 0.0)) for i, name in enumerate(task.class_names)},
                     **({"languages": part[lang].nunique(), "top language": float(part[lang].value_counts(normalize=True).iloc[0])}
                        if lang else {})})
    return pd.DataFrame(rows)


def write_folds(folds: pd.DataFrame, out: str | os.PathLike, force: bool = False, train=None) -> Path:
    out = Path(out)
    protect_existing(out, force, "folds file", sources=[train])
    write_csv(out, folds)
    return out


def load_folds(path: str | os.PathLike, ids: pd.Series | None = None) -> pd.DataFrame:
    """Read ``id,fold``; when ``ids`` is given, every one of them must have a fold."""
    path = Path(path)
    if not path.exists():
        raise KKError(f"{path} does not exist (run `kk make-folds` first)")
    if path.stat().st_size == 0:
        raise KKError(f"{path} is empty")
    check_unique_header(path)
    folds = pd.read_csv(path, dtype={"id": str})
    for col in ("id", "fold"):
        if col not in folds.columns:
            raise KKError(f"{path}: missing column {col} (a folds file is id,fold)")
    if not pd.api.types.is_integer_dtype(folds["fold"]) or (folds["fold"] < 0).any():
        raise KKError(f"{path}: the fold column must hold integers 0 or more")
    if folds["id"].duplicated().any():
        raise KKError(f"{path}: duplicate id {folds['id'][folds['id'].duplicated()].iloc[0]}")
    if ids is not None:
        missing = set(ids) - set(folds["id"])
        if missing:
            raise KKError(f"{path}: {len(missing)} train id(s) have no fold (e.g. {sorted(missing)[0]}); the folds were made for another file")
    return folds


def select_fold(folds: pd.DataFrame, fold: int, path: str = "folds file") -> tuple[set, set]:
    """(train ids, validation ids) for ``fold``; a fold that does not exist is an error."""
    available = sorted(int(f) for f in folds["fold"].unique())
    if fold not in available:
        raise KKError(f"fold {fold} is not in {path} (folds: {', '.join(map(str, available))})")
    val = set(folds.loc[folds["fold"] == fold, "id"])
    train = set(folds.loc[folds["fold"] != fold, "id"])
    return train, val
