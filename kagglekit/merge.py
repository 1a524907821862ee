"""`kk merge`: a run's K fold adapters as one model (the LMSYS winners' fold-LoRA averaging).

Two methods, because averaging LoRA factors is not averaging their products:

- ``factors``: average each ``lora_A`` and each ``lora_B`` over the folds (and the fully trained
  heads). Cheap, stays an adapter of the same rank, but ``mean(B) mean(A) != mean(B A)``.
- ``delta``: exact. Each fold's update ``dW_k = (alpha / r) B_k A_k`` is averaged and added to the
  base weights (``W + mean_k dW_k``); the heads are averaged. The result is a plain model (no
  adapter): what ``merge_and_unload`` of the averaged update would give.

``--unload`` with ``factors`` also folds the averaged adapter into a plain model. The merged model
is a run of its own (``<out>/fold_0``) that ``kk predict``, ``kk ensemble`` and ``kk kernel`` take.
Its ``oof.csv`` is the source folds' OOF (the merged model has seen every training row, so it has
no honest OOF of its own); ``metrics.json`` says so.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import KKError

ADAPTER = "adapter_model.safetensors"
PREFIX = "base_model.model."


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
    states = [load_safetensors(p / ADAPTER) for _, p in folds]
    if any(set(s) != set(states[0]) for s in states[1:]):
        raise KKError("the fold adapters hold different tensors; were they trained with one config?")
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


def merge_run(run_dir, out, folds="all", method: str = "factors", unload: bool = False, force: bool = False) -> Path:
    """Merge the fold adapters of ``run_dir`` into ``out/fold_0``; returns ``out``."""
    import pandas as pd
    import torch

    from .io import atomic_dir, write_json, write_text
    from .modeling import load_backbone, load_tokenizer, quiet_libraries, save_model
    from .predict import fold_config, trained_folds
    from .task import get_task

    quiet_libraries()
    if method not in ("factors", "delta"):
        raise KKError(f"--method must be factors or delta (got {method!r})")
    out = Path(out)
    if out.exists() and not force:
        raise KKError(f"{out} already exists; pass --force to replace it")
    found = trained_folds(run_dir, folds)
    if len(found) < 2:
        raise KKError(f"{run_dir}: merging needs at least two trained folds (found {len(found)})")
    if not all((p / "adapter_config.json").exists() for _, p in found):
        raise KKError(f"{run_dir}: only LoRA folds merge (a fold without adapter_config.json was fully fine-tuned)")
    cfg = fold_config(found[0][1])
    if cfg.model.quantization != "none" and (method == "delta" or unload):
        raise KKError("a quantized base cannot take merged weights; use --method factors without --unload")
    states, adapter_cfg = _load_adapters(found)
    t0 = time.time()
    with atomic_dir(out) as tmp:
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
            model = load_backbone(cfg.model, tokenizer, torch.device("cpu"), num_labels=get_task(cfg.task).n_classes)
            params = dict(model.named_parameters())
            if method == "delta":
                for path, delta in lora_deltas(states, adapter_cfg).items():
                    name = _base_param(path, params)
                    params[name].data += delta.to(params[name].dtype)
            else:  # factors, unloaded: the averaged adapter's own update B_mean A_mean
                for path, delta in lora_deltas([averaged], adapter_cfg).items():
                    name = _base_param(path, params)
                    params[name].data += delta.to(params[name].dtype)
            for key, value in averaged.items():  # the fully trained heads (pooler, classifier)
                if ".lora_" in key:
                    continue
                name = _base_param(key[len(PREFIX) :].rsplit(".", 1)[0], params, key.rsplit(".", 1)[1])
                params[name].data.copy_(value.to(params[name].dtype))
            save_model(model, tokenizer, dst)
            del model
        merged_cfg = cfg.model_copy(update={"name": f"{cfg.name}-merged"})
        write_text(dst / "config.yaml", merged_cfg.to_yaml())
        oof, oof_nt = [], []
        for _, p in found:
            oof.append(pd.read_csv(p / "oof.csv", dtype={"id": str}))
            if (p / "oof_no_tta.csv").exists():
                oof_nt.append(pd.read_csv(p / "oof_no_tta.csv", dtype={"id": str}))
        pd.concat(oof).to_csv(dst / "oof.csv", index=False)
        if len(oof_nt) == len(oof):
            pd.concat(oof_nt).to_csv(dst / "oof_no_tta.csv", index=False)
        source = [json.loads((p / "metrics.json").read_text()) for _, p in found]
        write_json(dst / "metrics.json", {
            "fold": 0, "task": cfg.task, "merged_from": str(run_dir), "source_folds": [k for k, _ in found], "method": method,
            "unloaded": bool(method == "delta" or unload), "oof": "the source folds' OOF, not this model's own",
            "val_log_loss": float(np.average([m["val_log_loss"] for m in source], weights=[m["n_val"] for m in source])),
            "n_val": int(sum(m["n_val"] for m in source)), "merge_s": round(time.time() - t0, 2),
            "versions": source[0].get("versions"),
        })
    return out


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


def compare_with_folds(run_dir, merged, test_path, folds="all") -> dict:
    """How far the merged model's test probabilities are from the fold ensemble's, and the speed-up of
    one pass instead of K (both with swap TTA, on rows no model was validated on)."""
    from .data import load_test
    from .predict import FoldModel, fold_config, trained_folds
    from .task import get_task

    found = trained_folds(run_dir, folds)
    df, _ = load_test(test_path, task=get_task(fold_config(found[0][1]).task))
    t = time.time()
    ens = np.mean([FoldModel(p).predict(df)["probs"] for _, p in found], axis=0)
    t_folds = time.time() - t
    t = time.time()
    one = FoldModel(Path(merged) / "fold_0").predict(df)["probs"]
    t_merged = time.time() - t
    diff = np.abs(one - ens)
    kl = float(np.mean(np.sum(ens * (np.log(np.clip(ens, 1e-12, 1)) - np.log(np.clip(one, 1e-12, 1))), axis=1)))
    return {"rows": len(df), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "kl_ensemble_to_merged": kl, "argmax_agreement": float((one.argmax(1) == ens.argmax(1)).mean()),
            "folds_s": t_folds, "merged_s": t_merged, "speedup": t_folds / max(t_merged, 1e-9)}
