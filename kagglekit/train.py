"""`kk train`: one model per fold, read top to bottom.

For fold K: train on the other folds, evaluate on fold K with swap TTA, keep the
best adapter by validation log loss, and leave a self-contained run folder::

    runs/<experiment>/fold_K/
      adapter_config.json, adapter_model.safetensors, tokenizer files
      config.yaml      the fully resolved config (the fold can be rebuilt from it)
      metrics.json     val log loss (with/without TTA), accuracy, swap flip rate, timing, truncation
      oof.csv          id,winner_model_a,winner_model_b,winner_tie for the fold's validation ids (TTA)
      oof_no_tta.csv   the same in the given A/B order only
      train_log.csv    step, epoch, lr, train loss, val loss when evaluated
      checkpoint/      only while unfinished: what --resume needs
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .errors import KKError

SWAP = [1, 0, 2]


class Interrupted(KKError):
    exit_code = 130


def run_dir_for(cfg: Config, run: str | Path | None = None) -> Path:
    return Path(run) if run else Path("runs") / cfg.name


def fold_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}"


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so --resume continues exactly."""

    epoch: int = 0
    micro: int = 0  # next micro-batch of the epoch's plan
    step: int = 0  # optimizer steps done
    samples: int = 0
    best_loss: float = float("inf")
    best_step: int = 0
    bad_evals: int = 0
    evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    log: list = field(default_factory=list)


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) when launched by torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_fold_frames(cfg: Config, fold: int):
    """(train rows, validation rows) of ``fold``, through the loader's checks."""
    from .data import load_train
    from .folds import load_folds, select_fold

    df, report = load_train(cfg.data.train, cfg.data.bad_rows)
    report.print_warnings()
    folds = load_folds(cfg.data.folds, df["id"])
    train_ids, val_ids = select_fold(folds, fold, cfg.data.folds)
    train_df = df[df["id"].isin(train_ids)].reset_index(drop=True)
    val_df = df[df["id"].isin(val_ids)].reset_index(drop=True)
    if len(train_df) == 0 or len(val_df) == 0:
        raise KKError(f"fold {fold} leaves no {'training' if len(train_df) == 0 else 'validation'} rows in {cfg.data.train}")
    return train_df, val_df


def load_soft_labels(path: str, ids) -> np.ndarray:
    """Teacher probabilities for ``ids`` from a CSV id,winner_model_a,winner_model_b,winner_tie."""
    from .data import read_probs

    p = Path(path)
    soft_ids, soft = read_probs(p, "data.soft_labels")
    index = {i: n for n, i in enumerate(soft_ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise KKError(f"{p}: no soft label for train id {missing[0]} ({len(missing)} missing)")
    probs = soft[[index[i] for i in ids]]
    bad = ~np.isfinite(probs).all(1) | (np.abs(probs.sum(1) - 1) > 1e-3) | (probs < 0).any(1)
    if bad.any():
        raise KKError(f"{p}: soft labels of id {list(ids)[int(bad.argmax())]} are not probabilities summing to 1")
    return probs


def plan_batches(lengths: list[int], units: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped micro-batches for one epoch, reproducible from (seed, epoch).

    Units (one sequence, or a pair of both A/B orders kept together) are shuffled,
    cut into chunks of ~32 batches, sorted by length inside a chunk (so a batch
    pads little), packed into micro-batches, and the batches shuffled again (so
    the model does not see lengths in order).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(units))
    unit_len = [max(lengths[i] for i in u) for u in units]
    per_unit = max(1, len(units[0]))
    chunk = max(1, batch_size * 32 // per_unit)
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk].tolist(), key=lambda u: (-unit_len[u], u))
        cur: list[int] = []
        for u in part:
            if cur and len(cur) + len(units[u]) > batch_size:
                batches.append(cur)
                cur = []
            cur.extend(units[u])
        if cur:
            batches.append(cur)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _lr_scheduler(optimizer, kind: str, warmup: int, total: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _prepare_output(out: Path, force: bool, resume: bool) -> None:
    """The explicit policy for a fold folder that exists already."""
    ckpt = out / "checkpoint"
    if force:
        if out.exists():
            shutil.rmtree(out)
        return
    if (out / "metrics.json").exists():
        raise KKError(f"{out} is already trained (metrics.json exists); pass --force to retrain it")
    if resume and not ckpt.exists():
        raise KKError(f"nothing to resume: {ckpt} does not exist")
    if ckpt.exists() and not resume:
        raise KKError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")


def train_fold(cfg: Config, fold: int, run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
               on_eval=None, on_step=None) -> dict:
    """Train one fold; returns its metrics (also written to metrics.json).

    ``on_eval(step, val_loss)`` is called after every evaluation (``kk tune`` reports
    to Optuna and prunes there); ``on_step(step)`` after every optimizer step.
    """
    from .modeling import quiet_libraries

    quiet_libraries()
    import torch
    import torch.nn.functional as F

    from .formatting import Formatter
    from .inference import pad_batch, predict_pairs
    from .io import atomic_path, write_csv, write_json, write_text
    from .metrics import accuracy, log_loss, per_class_accuracy, prior_log_loss, swap_flip_rate
    from .modeling import build_model, check_backbone, device_and_dtype, load_tokenizer, save_model, trainable_state
    from .ui import console, progress, table

    tc = cfg.train
    out = fold_dir(run_dir_for(cfg, run_dir), fold)
    # Multi-GPU: `torchrun --nproc_per_node N -m kagglekit.cli train ...` runs this on every rank with
    # PyTorch DDP. Each rank takes every N-th micro-batch; rank 0 evaluates, saves and logs.
    rank, world, local_rank = distributed()
    main = rank == 0
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if main or not force:
        _prepare_output(out, force, resume)
    if world > 1:
        dist.barrier()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(cfg.seed + fold)
    check_backbone(cfg.model.backbone)  # fail before the data is read
    train_df, val_df = load_fold_frames(cfg, fold)

    # --- model and inputs -------------------------------------------------------------------------------------
    device, amp_dtype = device_and_dtype(cfg.model.precision, f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else None)
    tokenizer = load_tokenizer(cfg.model.backbone)
    model = build_model(cfg, tokenizer, device, amp_dtype)
    model.train()
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fmt = Formatter.from_config(tokenizer, cfg.model)
    enc = fmt.encode_rows(train_df)
    seqs, trunc = fmt.sequences(enc, swap=False)
    if cfg.data.soft_labels:
        targets = load_soft_labels(cfg.data.soft_labels, train_df["id"])
    else:
        targets = np.eye(3)[train_df["label"].to_numpy()]
    n = len(seqs)
    units = [[i] for i in range(n)]
    if tc.swap_augment:
        # Each pair again with A and B exchanged and the label mapped (A<->B, tie stays):
        # the model cannot learn a position bias, and the data doubles for free.
        seqs_ba, _ = fmt.sequences(enc, swap=True)
        seqs = seqs + seqs_ba
        targets = np.concatenate([targets, targets[:, SWAP]])
        units = [[i, i + n] for i in range(n)] if tc.swap_same_batch else [[i] for i in range(2 * n)]
    targets_t = torch.tensor(targets, dtype=torch.float32)
    lengths = [len(s) for s in seqs]
    batch_size = tc.batch_size + (tc.batch_size % 2 if tc.swap_same_batch and tc.swap_augment else 0)

    # --- optimisation ---------------------------------------------------------------------------------------------
    def epoch_plan(epoch: int) -> list[list[int]]:
        plan = plan_batches(lengths, units, batch_size, cfg.seed, epoch)
        if world > 1:  # every rank the same number of micro-batches, or DDP would wait forever
            plan = plan[rank : len(plan) - len(plan) % world : world]
        return plan

    micro_per_epoch = len(epoch_plan(0))
    if micro_per_epoch == 0:
        raise KKError(f"too few training rows for {world} processes with batch size {batch_size}")
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norms (1-D tensors), the usual AdamW practice.
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    scheduler = _lr_scheduler(optimizer, tc.scheduler, int(tc.warmup_ratio * total_steps), total_steps)
    # fp16 needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    eval_every = tc.eval_every or steps_per_epoch

    state = Progress()
    best = {}
    ckpt_dir = out / "checkpoint"
    if resume:
        ck = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        state = Progress(**ck["progress"])
        best = ck["best"]
        if main:
            console.print(f"resuming fold {fold} at step {state.step} (epoch {state.epoch + 1})")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", cfg.to_yaml())

    def save_checkpoint() -> None:
        if not main:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt_dir / "state.pt") as tmp:
            torch.save(
                {
                    "model": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "progress": asdict(state),
                    "best": best,
                },
                tmp,
            )

    def evaluate() -> float:
        state.evals += 1
        loss = None
        if main:
            res = predict_pairs(model, fmt, val_df, tc.eval_batch_size, True, device, amp_dtype)
            loss = log_loss(res["probs"], val_df["label"].to_numpy())
            if loss < state.best_loss:
                state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
                best.update(probs=res["probs"], probs_ab=res["probs_ab"], probs_ba=res["probs_ba"], stats=res["stats"])
                save_model(model, tokenizer, out)  # the best adapter is what the fold keeps
            else:
                state.bad_evals += 1
            model.train()
        if world > 1:  # every rank takes rank 0's verdict, so early stopping is decided once
            shared = [loss, state.best_loss, state.best_step, state.bad_evals]
            dist.broadcast_object_list(shared, src=0)
            loss, state.best_loss, state.best_step, state.bad_evals = shared
        return loss

    # --- the loop -------------------------------------------------------------------------------------------------
    done = state.step >= total_steps or state.stopped_early
    group_loss, group_seqs = 0.0, 0
    t_start = time.time() - state.train_seconds
    with progress(disable=not main) as bar:
        task = bar.add_task(f"fold {fold}", total=total_steps, completed=state.step, status="")
        try:
            while not done and state.epoch < tc.epochs:
                plan = epoch_plan(state.epoch)
                while state.micro < len(plan) and not done:
                    group_start = state.micro - state.micro % tc.grad_accum
                    group = plan[group_start : group_start + tc.grad_accum]
                    n_group = sum(len(b) for b in group)  # sequences in this optimizer step
                    batch = plan[state.micro]
                    ids, mask = pad_batch([seqs[i] for i in batch], tokenizer.pad_token_id)
                    ids, mask = ids.to(device), mask.to(device)
                    last_of_group = state.micro - group_start + 1 == len(group)
                    # DDP averages gradients across ranks once per optimizer step, not per micro-batch.
                    sync = contextlib.nullcontext() if world == 1 or last_of_group else ddp_model.no_sync()
                    with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = ddp_model(input_ids=ids, attention_mask=mask).logits
                    # Soft or hard targets alike: cross-entropy against a distribution.
                    loss = F.cross_entropy(logits.float(), targets_t[batch].to(device), label_smoothing=tc.label_smoothing, reduction="sum")
                    if not torch.isfinite(loss):
                        raise KKError(
                            f"non-finite loss at step {state.step + 1} of fold {fold}"
                            + (" (fp16 overflow is a known DeBERTa-v3 issue: use --set model.precision=bf16 or fp32)" if amp_dtype == torch.float16 else " (try a lower train.lr)")
                        )
                    if world > 1 and not last_of_group:
                        with ddp_model.no_sync():
                            scaler.scale(loss / n_group).backward()
                    else:
                        scaler.scale(loss / n_group).backward()
                    group_loss += loss.item()
                    group_seqs += len(batch)
                    state.micro += 1
                    state.samples += len(batch)
                    if state.micro - group_start < len(group):
                        continue  # keep accumulating
                    # One optimizer step per grad_accum micro-batches (the last one of an epoch may be shorter).
                    scaler.unscale_(optimizer)
                    if tc.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.train_seconds = time.time() - t_start
                    row = {"step": state.step, "epoch": state.epoch + 1, "lr": scheduler.get_last_lr()[0],
                           "train_loss": group_loss / group_seqs, "val_loss": None}
                    group_loss, group_seqs = 0.0, 0
                    rate = state.samples / max(state.train_seconds, 1e-9)
                    bar.update(task, completed=state.step, status=f"loss {row['train_loss']:.4f} lr {row['lr']:.2e} {rate:.1f} samples/s")
                    end_of_epoch = state.micro == len(plan)
                    last = state.step >= total_steps
                    if state.step % eval_every == 0 or last or (tc.eval_every == 0 and end_of_epoch):
                        row["val_loss"] = evaluate()
                        bar.update(task, status=f"val {row['val_loss']:.4f} (best {state.best_loss:.4f} @ {state.best_step})")
                        if tc.patience and state.bad_evals >= tc.patience:
                            state.stopped_early = True
                    state.log.append(row)
                    done = last or state.stopped_early
                    if row["val_loss"] is not None:
                        save_checkpoint()
                        if on_eval is not None:
                            on_eval(state.step, row["val_loss"])
                    if on_step is not None:
                        on_step(state.step)
                if state.micro >= len(plan):
                    state.epoch, state.micro = state.epoch + 1, 0
        except KeyboardInterrupt:
            # Roll back to the last optimizer step: half-accumulated gradients are discarded.
            optimizer.zero_grad(set_to_none=True)
            state.micro -= state.micro % tc.grad_accum
            save_checkpoint()
            raise Interrupted(f"interrupted at step {state.step} of fold {fold}; checkpoint saved in {ckpt_dir}; continue with --resume") from None
    if state.evals == 0:
        state.log.append({"step": state.step, "epoch": state.epoch, "lr": 0.0, "train_loss": None, "val_loss": evaluate()})
    if world > 1:
        dist.barrier()
    if not main:
        return {"fold": fold, "rank": rank}
    if "probs" not in best:
        raise KKError(f"fold {fold}: the validation log loss was never finite; nothing to keep")

    # --- outputs --------------------------------------------------------------------------------------------------
    import pandas as pd

    from .data import LABEL_COLUMNS

    labels = val_df["label"].to_numpy()
    probs, probs_ab, probs_ba = best["probs"], best["probs_ab"], best["probs_ba"]
    write_csv(out / "oof.csv", pd.DataFrame({"id": val_df["id"], **{c: probs[:, j] for j, c in enumerate(LABEL_COLUMNS)}}))
    write_csv(out / "oof_no_tta.csv", pd.DataFrame({"id": val_df["id"], **{c: probs_ab[:, j] for j, c in enumerate(LABEL_COLUMNS)}}))
    write_csv(out / "train_log.csv", pd.DataFrame(state.log, columns=["step", "epoch", "lr", "train_loss", "val_loss"]))
    wall = state.train_seconds
    metrics = {
        "fold": fold,
        "val_log_loss": log_loss(probs, labels),
        "val_log_loss_no_tta": log_loss(probs_ab, labels),
        "val_accuracy": accuracy(probs, labels),
        "val_per_class_accuracy": per_class_accuracy(probs, labels),
        "swap_flip_rate": swap_flip_rate(probs_ab, probs_ba),
        "prior_log_loss": prior_log_loss(labels),
        "best_step": state.best_step,
        "steps": state.step,
        "epochs_run": round(state.step / steps_per_epoch, 3),
        "stopped_early": state.stopped_early,
        "n_train": int(len(train_df)),
        "n_val": int(len(val_df)),
        "wall_time_s": round(wall, 2),
        "train_samples_per_s": round(state.samples / max(wall, 1e-9), 3),
        "truncation": {"train": trunc.summary(), "val": best["stats"].summary()},
        "device": str(device),
    }
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    console.print(
        table(
            f"fold {fold}: {out}",
            ["metric", "value"],
            [
                ["val log loss (TTA)", metrics["val_log_loss"]],
                ["val log loss (no TTA)", metrics["val_log_loss_no_tta"]],
                ["class-prior log loss", metrics["prior_log_loss"]],
                ["accuracy", metrics["val_accuracy"]],
                ["swap flip rate", metrics["swap_flip_rate"]],
                ["best step / steps", f"{state.best_step} / {state.step}"],
                ["rows truncated (train)", metrics["truncation"]["train"]["share_truncated"]],
                ["samples/s", metrics["train_samples_per_s"]],
            ],
        )
    )
    return metrics


def train_folds(cfg: Config, folds: str, run_dir=None, resume: bool = False, force: bool = False) -> list[dict]:
    """``folds`` is a fold number or ``all`` (every fold of the folds file, finished ones skipped)."""
    from .folds import load_folds
    from .ui import info

    if folds == "all":
        ids = sorted(int(f) for f in load_folds(cfg.data.folds)["fold"].unique())
        results = []
        for k in ids:
            out = fold_dir(run_dir_for(cfg, run_dir), k)
            if (out / "metrics.json").exists() and not force:
                info(f"fold {k}: already trained in {out}, skipped (--force retrains)")
                continue
            results.append(train_fold(cfg, k, run_dir, resume=resume and (out / "checkpoint").exists(), force=force))
        return results
    try:
        k = int(folds)
    except ValueError:
        raise KKError(f"--fold must be a fold number or 'all' (got {folds!r})") from None
    return [train_fold(cfg, k, run_dir, resume=resume, force=force)]
