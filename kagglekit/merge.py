"""`kk merge`: a run's K fold adapters as one model (the LMSYS winners' fold-LoRA averaging).

- ``factors``: average each ``lora_A`` and ``lora_B`` (and the heads): stays an adapter, but
  ``mean(B) mean(A) != mean(B A)``, close only because every fold starts from the same seeded initialisation.
- ``delta``: exact: ``W + mean_k (alpha / r) B_k A_k``, heads averaged: a plain model.

``--unload`` folds a ``factors`` adapter into a plain model. The result is a run (``<out>/fold_0``) that ``kk
predict``, ``kk ensemble`` and ``kk kernel`` take; its ``oof.csv`` is the source folds' (it has no honest OOF of its
own) and metrics.json records their cross-fitted calibration, which ``kk ensemble`` carries over. It is compared
with the fold ensemble on a sample of OOF rows, with a warning when it is as far from it as a single fold is.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from .errors import KKError

ADAPTER = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "spm.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt", "vocab.json",
                   "merges.txt")  # what decides the token ids (not tokenizer_config.json, which may name a path)
FAR_FROM_ENSEMBLE = 0.5  # warn when the merged model is this share of a single fold's distance from the fold ensemble


def _base_record(fold_path: Path) -> dict:
    """What a fold's adapter was trained over: the backbone (a local folder by its resolved path), how it
    was read (pooling, quantization) and the tokenizer's files by hash."""
    from .runs import fold_config

    cfg = fold_config(fold_path)
    backbone = cfg.model.backbone
    if Path(backbone).expanduser().is_dir():
        backbone = str(Path(backbone).expanduser().resolve())
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (fold_path / name).is_file():
            h.update(name.encode() + b"\0" + (fold_path / name).read_bytes())
    return {"backbone": backbone, "pooling": cfg.model.pooling, "quantization": cfg.model.quantization,
            "tokenizer": h.hexdigest()[:16]}


def check_same_base(folds: list[tuple[int, Path]]) -> None:
    """Adapters merge only over one backbone and one tokenizer: compared from what each fold recorded
    (config.yaml, its tokenizer files) before any tensor is read."""
    k0, ref = folds[0][0], _base_record(folds[0][1])
    for _, p in folds[1:]:
        rec = _base_record(p)
        diff = [key for key in ref if rec[key] != ref[key]]
        if diff:
            what = "; ".join(f"{key} {rec[key]!r}, fold {k0}'s {ref[key]!r}" if key != "tokenizer" else
                             "its tokenizer files differ" for key in diff)
            raise KKError(f"{p}: trained over another base than fold {k0} ({what}); only folds of one backbone and "
                          "tokenizer merge")


def _load_adapters(folds: list[tuple[int, Path]]) -> tuple[list[dict], dict]:
    from .adapters import read_adapter_config
    from .io import load_safetensors

    configs = [read_adapter_config(p) for _, p in folds]
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    for (_, p), c in zip(folds[1:], configs[1:]):
        diff = [key for key in keys if c.get(key) != configs[0].get(key)]
        if diff:
            raise KKError(f"{p}: adapter differs from fold {folds[0][0]}'s in {', '.join(diff)}; only adapters of one base and rank merge")
    if configs[0].get("use_dora"):
        raise KKError("DoRA adapters do not merge by averaging; retrain with plain LoRA")
    states = [load_safetensors(p / ADAPTER) for _, p in folds]  # nothing a safetensors file holds executes code
    if any(set(s) != set(states[0]) for s in states[1:]):
        raise KKError("the fold adapters hold different tensors; were they trained with one config?")
    for (_, p), st in zip(folds[1:], states[1:]):
        for key, value in st.items():
            if value.shape != states[0][key].shape:
                raise KKError(f"{p / ADAPTER}: {key} has shape {tuple(value.shape)}, fold {folds[0][0]}'s "
                              f"{tuple(states[0][key].shape)}; only adapters of one base and rank merge")
    return states, configs[0]


def average_factors(states: list[dict]) -> dict:
    """Every tensor (lora_A, lora_B, heads) averaged over the folds."""
    import torch

    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def lora_deltas(states: list[dict], adapter_cfg: dict) -> dict:
    """{module path: mean over folds of (alpha / r) B_k A_k}: the exact average of the folds' updates."""
    import math

    import torch

    r, alpha = adapter_cfg["r"], adapter_cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha / r
    out = {}
    for key in states[0]:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PREFIX) : -len(".lora_A.weight")]
        b_key = key.replace(".lora_A.", ".lora_B.")
        out[path] = torch.stack([(s[b_key].float() @ s[key].float()) * scale for s in states]).mean(0)
    return out


def merge_run(run_dir, out, folds="all", method: str = "factors", unload: bool = False, force: bool = False,
              check_rows: int = 200) -> Path:
    """Merge the fold adapters of ``run_dir`` into ``out/fold_0``; returns ``out``.

    ``check_rows``: compare the merged model with the fold ensemble on this many OOF rows (0: skip); the result
    is in its metrics.json (``fold_ensemble_check``), with a warning when it is far."""
    import torch

    from .data import read_probs
    from .io import atomic_dir, claim_output_dir, mark_output_dir, write_json, write_text
    from .modeling import load_backbone, load_tokenizer, quiet_libraries, save_model
    from .runs import open_run

    quiet_libraries()
    if method not in ("factors", "delta"):
        raise KKError(f"--method must be factors or delta (got {method!r})")
    out = Path(out)
    claim_output_dir(out, force, "merge", sources=[run_dir])  # --force replaces an earlier merge, nothing else
    run = open_run(run_dir, folds)
    found = [(f.index, f.path) for f in run.folds]
    if len(found) < 2:
        raise KKError(f"{run_dir}: merging needs at least two trained folds (found {len(found)})")
    if not all((p / "adapter_config.json").exists() for _, p in found):
        raise KKError(f"{run_dir}: only LoRA folds merge (a fold without adapter_config.json was fully fine-tuned)")
    cfg = run.folds[0].cfg
    if cfg.model.quantization != "none" and (method == "delta" or unload):
        raise KKError("a quantized base cannot take merged weights; use --method factors without --unload")
    check_same_base(found)
    source = [f.metrics for f in run.folds]
    task = run.task
    oof = [read_probs(p / "oof.csv", "OOF", task) for _, p in found]
    oof_nt = [read_probs(p / "oof_no_tta.csv", "OOF", task) for _, p in found if (p / "oof_no_tta.csv").exists()]
    states, adapter_cfg = _load_adapters(found)
    t0 = time.time()
    with atomic_dir(out) as tmp:
        mark_output_dir(tmp, "merge")
        dst = tmp / "fold_0"
        dst.mkdir()
        tokenizer = load_tokenizer(str(found[0][1]))
        averaged = average_factors(states)
        if method == "factors" and not unload:
            from .io import save_safetensors

            save_safetensors(averaged, dst / ADAPTER)
            shutil.copy2(found[0][1] / "adapter_config.json", dst / "adapter_config.json")
            tokenizer.save_pretrained(dst)
        else:
            model = load_backbone(cfg.model, tokenizer, torch.device("cpu"), num_labels=task.n_classes)
            params = dict(model.named_parameters())
            # delta: the mean of the folds' updates; factors, unloaded: the averaged adapter's own update B_mean A_mean
            for path, delta in lora_deltas(states if method == "delta" else [averaged], adapter_cfg).items():
                name = _base_param(path, params)
                params[name].data += delta.to(params[name].dtype)
            for key, value in averaged.items():  # the fully trained heads (pooler, classifier)
                if ".lora_" in key:
                    continue
                name = _base_param(key[len(PREFIX) :].rsplit(".", 1)[0], params, key.rsplit(".", 1)[1])
                params[name].data.copy_(value.to(params[name].dtype))
            save_model(model, tokenizer, dst)
            del model
        merge_s = round(time.time() - t0, 2)
        merged_cfg = cfg.model_copy(update={"name": f"{cfg.name}-merged"})
        write_text(dst / "config.yaml", merged_cfg.to_yaml())

        def frame(parts):
            return task.prob_frame(np.concatenate([i for i, _ in parts]), np.concatenate([p for _, p in parts]))

        frame(oof).to_csv(dst / "oof.csv", index=False)
        if len(oof_nt) == len(oof):
            frame(oof_nt).to_csv(dst / "oof_no_tta.csv", index=False)
        calibration, check = _judge_against_source(run, tmp, check_rows)
        write_json(dst / "metrics.json", {
            "fold": 0, "task": cfg.task, "generation": uuid.uuid4().hex, "merged_from": str(run_dir),
            "source_folds": [k for k, _ in found], "method": method, "unloaded": bool(method == "delta" or unload),
            "oof": "the source folds' OOF, not this model's own",

            "val_log_loss": float(np.average([m["val_log_loss"] for m in source], weights=[m["n_val"] for m in source])),
            "n_val": int(sum(m["n_val"] for m in source)), "merge_s": merge_s, "versions": source[0].get("versions"),
            # what kk ensemble applies to this model instead of fitting on OOF it did not produce
            "calibration": calibration, "fold_ensemble_check": check,
        })
    return out


def _judge_against_source(run, merged, check_rows: int) -> tuple[dict | None, dict | None]:
    """(the source fold ensemble's cross-fitted calibration, the merged model's distance from the fold ensemble
    on ``check_rows`` OOF rows); either is None, with a warning, when the train file cannot be read."""
    from .data import load_train
    from .ensemble import calibrate
    from .runs import oof_set
    from .ui import warn

    cfg = run.folds[0].cfg
    try:
        train_df, report = load_train(cfg.data.train, cfg.data.bad_rows, task=run.task)
        rp = oof_set([run], train_df, {rid for rid, _ in report.skipped})
    except (KKError, OSError) as e:
        warn(f"kk merge: no calibration carried over and no comparison with the fold ensemble: {e}")
        return None, None
    _, t, _, cal = calibrate(rp.oofs, rp.y, folds=rp.folds)
    calibration = {"source": str(run.path), "temperature": float(t), "kept": bool(cal["kept"]),
                   "uncalibrated": cal["uncalibrated"], "cross_fitted": cal["cross_fitted"]}
    if check_rows <= 0:
        return calibration, None
    rng = np.random.default_rng(cfg.seed)
    ids = set(rng.choice(rp.runs[0].ids, size=min(check_rows, len(rp.ids)), replace=False).tolist())
    rows = train_df[train_df["id"].isin(ids)].reset_index(drop=True)
    check = compare_with_folds(run, merged, rows=rows)
    check = {k: check[k] for k in ("rows", "mean_abs_diff", "max_abs_diff", "fold_mean_abs_diff", "argmax_agreement")}
    # It stands for the fold ensemble only when it is much closer to it than a single fold is.
    check["far"] = bool(check["mean_abs_diff"] > max(FAR_FROM_ENSEMBLE * check["fold_mean_abs_diff"], 1e-3))
    if check["far"]:
        warn(f"kk merge: the merged model is {check['mean_abs_diff']:.4f} from the fold ensemble on {check['rows']} OOF rows "
             f"(mean |p_merged - p_folds|), not much closer to it than a single fold is ({check['fold_mean_abs_diff']:.4f}): "
             "it does not stand for the ensemble; try --method delta, or folds trained from one initialisation (this version)")
    return calibration, check


def _base_param(path: str, params: dict, leaf: str = "weight") -> str:
    """The base model's parameter for an adapter module path (pooling wrappers included)."""
    candidates = [f"{path}.{leaf}", f"{path}.inner.{leaf}"]
    if "." in path:
        head, last = path.rsplit(".", 1)
        candidates.append(f"{head}.inner.{last}.{leaf}")
    for name in candidates:
        if name in params:
            return name
    raise KKError(f"merging: the base model has no parameter for {path}.{leaf}")


def compare_with_folds(run, merged, test_path=None, rows=None) -> dict:
    """How far the merged model's probabilities are from the fold ensemble's (both with swap TTA) on the rows of
    ``test_path`` (or the parsed ``rows``): mean and max |p_merged - p_folds|, a single fold's mean distance from the
    ensemble for scale, and the speed-up of one pass instead of K. ``run``: the source run (a folder, or a Run)."""
    from .data import load_test
    from .inference import TokenCache
    from .predict import FoldModel
    from .runs import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    df = rows if rows is not None else load_test(test_path, task=run.task)[0]
    cache = TokenCache()  # the folds and the merged model share a tokenizer: the rows are tokenized once
    t = time.time()
    parts = []
    for f in run.folds:
        fm = FoldModel(f.path)
        parts.append(fm.predict(df, cache=cache)["probs"])
        fm.release()
    ens = np.mean(parts, axis=0)
    t_folds = time.time() - t
    t = time.time()
    one = FoldModel(Path(merged) / "fold_0").predict(df, cache=cache)["probs"]
    t_merged = time.time() - t
    diff = np.abs(one - ens)
    kl = float(np.mean(np.sum(ens * (np.log(np.clip(ens, 1e-12, 1)) - np.log(np.clip(one, 1e-12, 1))), axis=1)))
    return {"rows": len(df), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "fold_mean_abs_diff": float(np.mean([np.abs(p - ens).mean() for p in parts])),
            "kl_ensemble_to_merged": kl, "argmax_agreement": float((one.argmax(1) == ens.argmax(1)).mean()),
            "folds_s": t_folds, "merged_s": t_merged, "speedup": t_folds / max(t_merged, 1e-9)}
