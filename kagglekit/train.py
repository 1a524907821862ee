"""`kk train`: one model per fold, read top to bottom; the fold folder it leaves is described in the README
("The run folder"). Multi-GPU (train.strategy): DDP, torch's FSDP2 or DeepSpeed ZeRO under torchrun/accelerate launch."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .batching import plan_batches
from .config import Config
from .errors import KKError
from .task import Task, get_task


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
    best_metric: float | None = None  # the task's metric at the best evaluation (accuracy tasks choose by it)
    best_step: int = 0
    bad_evals: int = 0
    evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    pending_eval: bool = False  # the last step's evaluation is due (or was interrupted)
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

    df, report = load_train(cfg.data.train, cfg.data.bad_rows, get_task(cfg.task))
    report.print_warnings()
    folds = load_folds(cfg.data.folds, df["id"])
    train_ids, val_ids = select_fold(folds, fold, cfg.data.folds)
    train_df = df[df["id"].isin(train_ids)].reset_index(drop=True)
    val_df = df[df["id"].isin(val_ids)].reset_index(drop=True)
    if len(train_df) == 0 or len(val_df) == 0:
        raise KKError(f"fold {fold} leaves no {'training' if len(train_df) == 0 else 'validation'} rows in {cfg.data.train}")
    return train_df, val_df


def param_groups(model, tc) -> list[dict]:
    """AdamW groups: backbone/LoRA at ``train.lr``, the new head at ``train.head_lr``;
    no weight decay on biases and norms (1-D tensors), the usual AdamW practice."""
    from .modeling import is_head_param

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_head_param(name), p.ndim > 1), []).append(p)
    return [{"params": ps, "weight_decay": tc.weight_decay if decay else 0.0, "lr": (tc.head_lr or tc.lr) if head else tc.lr}
            for (head, decay), ps in sorted(groups.items())]


def lr_scheduler(optimizer, kind: str, warmup: int, total: int):
    from transformers import get_scheduler

    return get_scheduler("constant_with_warmup" if kind == "constant" else kind, optimizer, warmup, total)


# --- the fold folder: policy, lock, and the swap at the end ---------------------------------------------------------


@contextlib.contextmanager
def claim_fold(out: Path, force: bool, resume: bool, main: bool = True):
    """Yield the folder a fold trains into, under a lock; the explicit policy for existing folders.

    A fold that exists is never touched before its replacement is complete: ``--force``
    trains into ``fold_K.retrain/`` beside it and swaps it in only at the end, so a typo,
    a crash or Ctrl-C leaves the old adapter, metrics and OOF as they were. One process
    at a time per fold (``.fold_K.lock``, released by the kernel whatever kills the owner).
    """
    from .io import check_writable, file_lock

    retrain = out.with_name(f"{out.name}.retrain")
    if not main:  # DDP ranks > 0 write nothing; they take the folder rank 0 takes, by the same rule
        yield retrain if force and out.exists() and any(out.iterdir()) else out
        return
    check_writable(out.parent, "run folder")
    with file_lock(out.with_name(f".{out.name}.lock"), f"fold folder {out}"):
        if force and out.exists() and any(out.iterdir()):
            work = retrain
            if resume and not (work / "checkpoint" / "state.pt").exists():
                raise KKError(f"nothing to resume: {work / 'checkpoint'} does not exist")
            if not resume and work.exists():
                shutil.rmtree(work)  # a stale, interrupted retrain: --force starts it over
        else:
            work = out
            ckpt = out / "checkpoint"
            if (out / "metrics.json").exists() and not force:
                if (retrain / "checkpoint" / "state.pt").exists():  # an interrupted `--force`: it resumes with --force too
                    raise KKError(f"{out} is already trained and an interrupted retrain of it is in {retrain}; "
                                  + ("continue it with --resume --force" if resume else
                                     "continue it with --resume --force, or start the retrain over with --force"))
                raise KKError(f"{out} is already trained (metrics.json exists); pass --force to retrain it")
            if resume and not ckpt.exists():
                raise KKError(f"nothing to resume: {ckpt} does not exist")
            if ckpt.exists() and not resume and not force:
                raise KKError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
        fresh = not work.exists()
        try:
            yield work
        except BaseException:
            if fresh and not (work / "checkpoint").exists() and not (work / "metrics.json").exists():  # nothing to resume
                shutil.rmtree(work, ignore_errors=True)
            raise
        if work != out:  # the new fold is complete: now, and only now, it replaces the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if out.exists() or out.is_symlink():
                os.replace(out, old)
            os.replace(work, out)
            old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt(defer_to=None):
    """SIGTERM (what cloud and Kaggle preemption send) is handled like Ctrl-C: checkpoint, then exit. ``defer_to`` (a
    sharded multi-process session): SIGTERM and Ctrl-C only set its ``stop_requested``, and every rank stops at the
    end of the same step (its checkpoint is a collective, see _end_of_step)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if defer_to is None:
            raise KeyboardInterrupt
        defer_to.stop_requested = True

    signals = (signal.SIGTERM,) if defer_to is None else (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


# --- the story of a fold ----------------------------------------------------------------------------------------------


def _oom_as_one_line(fn):
    """An out-of-memory error that nothing retried (a model that does not load, the optimizer's first step...)
    is one line naming the settings to lower, never a traceback (and a failed trial in ``kk tune``)."""

    @functools.wraps(fn)
    def wrapper(cfg, fold, *args, **kwargs):
        try:
            return fn(cfg, fold, *args, **kwargs)
        except Exception as e:
            from .memory import OutOfMemory, is_oom

            if not is_oom(e):
                raise
            raise OutOfMemory(f"fold {fold}: out of GPU memory ({str(e).splitlines()[0][:120]}); lower train.batch_size or "
                              "train.max_tokens, or set model.gradient_checkpointing=true or model.quantization=4bit") from None

    return wrapper


@_oom_as_one_line
def train_fold(cfg: Config, fold: int, run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
               on_eval=None, on_step=None) -> dict:
    """Train one fold; returns its metrics (also written to metrics.json).

    ``on_eval(step, value)`` is called after every evaluation with the task's metric (val log loss for
    LMSYS, val accuracy for WSDM; ``kk tune`` reports it to Optuna and prunes there); ``on_step(step)`` after every optimizer step.
    """
    out = fold_dir(run_dir_for(cfg, run_dir), fold)
    rank, world, _ = distributed()
    strategy = resolve_strategy(cfg, world)
    _init_distributed(world, strategy)
    with claim_fold(out, force, resume, main=rank == 0) as work:     # lock; an old fold stays until the new one is done
        _barrier(world)
        s = start_session(cfg, fold, work, resume, strategy)         # backbone checked, device, tokenizer; resumed config checked
        inputs = prepare_inputs(cfg, fold, s.fmt)                    # rows -> token sequences, targets
        record_config(s)                                             # config.yaml, once the fold is known to be trainable
        setup_training(s, inputs)                                    # model, optimizer, schedule; a checkpoint resumed
        fit(s, inputs, on_eval, on_step)                             # the loop: steps, evaluations, checkpoints
        _barrier(world)
        if rank != 0:
            return {"fold": fold, "rank": rank}
        metrics = write_outputs(s, inputs)                           # oof, metrics, log; the checkpoint goes
    _print_metrics(out, metrics)
    return metrics


DDP_TIMEOUT_MINUTES = 60  # rank 0 saves adapters and checkpoints while the other ranks wait in a collective
SHARDED = ("fsdp", "deepspeed")  # each rank holds a shard: forwards, saves and loads are collective


def resolve_strategy(cfg: Config, world: int) -> str:
    """train.strategy: "ddp" (auto: one process, or DDP under a multi-process launch), "fsdp" or "deepspeed"."""
    strategy = cfg.train.strategy
    if strategy in SHARDED and "MASTER_ADDR" not in os.environ:
        raise KKError(f"train.strategy={strategy} runs under a launcher: torchrun --nproc_per_node N -m kagglekit.cli -- "
                      "train ... (or accelerate launch -m kagglekit.cli train ...)")
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise KKError("train.strategy=deepspeed needs DeepSpeed on GPUs (pip install deepspeed)") from None
    return strategy if strategy in SHARDED else "ddp"


def _init_distributed(world: int, strategy: str = "ddp") -> None:
    if world > 1 or strategy in SHARDED:
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            kwargs = {"timeout": datetime.timedelta(minutes=DDP_TIMEOUT_MINUTES)}
            if torch.cuda.is_available():
                # One GPU per rank, chosen before the first collective (NCCL's calls use the current device).
                torch.cuda.set_device(distributed()[2])
                kwargs["device_id"] = torch.device("cuda", distributed()[2])
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- inputs -----------------------------------------------------------------------------------------------------------


@dataclass
class FoldInputs:
    """What a fold trains and validates on, as the loop needs it."""

    train_df: object
    val_df: object
    seqs: list  # token id arrays; with swap augmentation the B/A order follows the A/B order
    targets: np.ndarray  # (len(seqs), C) a teacher's probabilities, NaN rows where none; with labels=None: one-hot labels
    units: list[list[int]]  # what plan_batches shuffles: one sequence, or both orders of a pair
    trunc: object  # TruncationStats of the training rows
    batch_size: int
    n_extra: int = 0  # extra rows among the training rows (data.extra)
    segs: list | None = None  # per sequence: 1 on the first response, 2 on the second (model.pooling: pair)
    labels: np.ndarray | None = None  # (len(seqs),) hard class, -1 where none; None: targets are one-hot hard labels
    extra_dropped: dict = field(default_factory=dict)  # data.extra rows kept out of this fold, per reason

    def loss_targets(self):
        """(teacher probabilities or None when no row has any, hard labels) as tensors for training_loss."""
        import torch

        if self.labels is None:
            return None, torch.as_tensor(np.asarray(self.targets).argmax(1), dtype=torch.long)
        soft = None if np.isnan(self.targets).all() else torch.tensor(self.targets, dtype=torch.float32)
        return soft, torch.as_tensor(self.labels, dtype=torch.long)


def prepare_inputs(cfg: Config, fold: int, fmt) -> FoldInputs:
    """Rows of the fold, tokenized once through the shared formatter, swap-augmented."""
    import pandas as pd

    from .distill import fold_soft_labels
    from .extra import load_extra

    tc, task = cfg.train, get_task(cfg.task)
    train_df, val_df = load_fold_frames(cfg, fold)
    # Every training row has its hard label; with data.soft_labels also a teacher's probabilities, and the loss
    # mixes the two (train.distill). A per-fold file holds labels made without fold K's validation rows.
    labels = train_df["label"].to_numpy()
    if cfg.data.soft_labels:
        targets = fold_soft_labels(cfg.data.soft_labels, fold, train_df["id"], val_df["id"], task)
    else:
        targets = np.full((len(train_df), task.n_classes), np.nan)
    # Extra rows join the training rows only: never validated on, and never one that is a train row or shares a
    # prompt with this fold's validation rows (those would let the fold validate on what it trained on).
    extra = load_extra(cfg, fold, train_df, val_df)
    cols = ["id", *task.text_columns]
    rows = pd.concat([train_df[cols], extra.rows[cols]], ignore_index=True) if len(extra.rows) else train_df
    targets = np.concatenate([targets, extra.soft])
    labels = np.concatenate([labels, extra.hard]).astype(np.int64)
    enc = fmt.encode_rows(rows)
    seqs, trunc = fmt.sequences(enc, swap=False)
    segs = fmt.segments(trunc) if cfg.model.pooling == "pair" else None
    n = len(seqs)
    units = [[i] for i in range(n)]
    if tc.swap_augment:
        # Each pair again with A and B exchanged and the label mapped by the task's swap (A<->B, a tie
        # stays): the model cannot learn a position bias, and the data doubles for free.
        seqs_ba, trunc_ba = fmt.sequences(enc, swap=True)
        seqs = seqs + seqs_ba
        if segs is not None:
            segs = segs + fmt.segments(trunc_ba)
        targets = np.concatenate([targets, task.swap_probs(targets)])
        labels = np.concatenate([labels, task.swap_labels(labels)])
        units = [[i, i + n] for i in range(n)] if tc.swap_same_batch else [[i] for i in range(2 * n)]
    batch_size = tc.batch_size + (tc.batch_size % 2 if tc.swap_same_batch and tc.swap_augment else 0)
    return FoldInputs(train_df, val_df, seqs, targets, units, trunc, batch_size, n_extra=len(rows) - len(train_df), segs=segs,
                      labels=labels, extra_dropped=extra.dropped)


# --- the session: model, optimizer and the state the loop changes ----------------------------------------------------


@dataclass
class Session:
    """Everything the loop reads and changes, in one place (no closures sharing state)."""

    cfg: Config
    fold: int
    work: Path
    device: object
    amp_dtype: object
    tokenizer: object
    fmt: object
    model: object = None
    wrapped: object = None  # what the forward runs through: the model, DDP's wrapper or DeepSpeed's engine
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    state: Progress = field(default_factory=Progress)
    best: dict = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    resume: bool = False
    steps_per_epoch: int = 0
    total_steps: int = 0
    rng: object = None  # torch RNG state at the start of the current optimizer step
    last_checkpoint: float = 0.0
    max_tokens: int = 0  # token budget of a micro-batch (train.max_tokens resolved); 0 = train.batch_size rows
    last_metric: float | None = None  # the task's metric at the last evaluation
    eval_fmt: object = None  # the validation's formatter: predict.max_length, as the test rows will be formatted
    max_packed: int = 0  # train.packing: the longest packed row (0 = no cap; see packed_cap)
    pieces: int = 1  # each micro-batch runs in this many pieces (after an out-of-memory error, or on a smaller GPU)
    val: tuple | None = None  # predict_validation's, once per fold: this rank's rows, their frame, a token cache, an engine
    strategy: str = "ddp"  # resolve_strategy's
    stop_requested: bool = False  # sharded runs: a SIGTERM/Ctrl-C seen, acted on by every rank at the end of the step
    shard_name: str = ""  # sharded runs: the checkpoint subfolder state.pt names

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.work / "checkpoint"

    @property
    def task(self) -> Task:
        return get_task(self.cfg.task)


def start_session(cfg: Config, fold: int, work: Path, resume: bool, strategy: str = "ddp") -> Session:
    """Device, tokenizer and formatter of a fold; the backbone is checked before any data is read."""
    from .formatting import Formatter
    from .modeling import check_backbone, device_and_dtype, load_tokenizer, quiet_libraries

    quiet_libraries()
    import torch

    rank, world, local_rank = distributed()
    cfg = resolve_init_from(cfg, fold)  # config.yaml records the resolved path: compared so on --resume
    if resume:
        check_resumed_config(cfg, work)  # before anything is loaded or written
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_backbone(cfg.model.backbone)  # fail before the data is read
    device, amp_dtype = device_and_dtype(cfg.model.precision, f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else None)
    tokenizer = load_tokenizer(cfg.model.backbone)
    fmt = Formatter.from_config(tokenizer, cfg.model)
    # Validation formats rows as inference will (predict.max_length), so the OOF predictions that ensemble weights and
    # temperatures are fitted on match the test predictions.
    eval_model = cfg.model.model_copy(update={"max_length": cfg.inference_model().max_length})
    eval_fmt = fmt if eval_model.max_length == cfg.model.max_length else Formatter.from_config(tokenizer, eval_model)
    if strategy == "fsdp" and (amp_dtype == torch.float16 or cfg.model.quantization != "none"):
        raise KKError(f"train.strategy=fsdp trains unquantized weights in bf16 or fp32, not {cfg.model.quantization.replace('none', 'fp16')}: "
                      "use train.strategy=deepspeed (ZeRO-2 with 4-bit, as the LMSYS 1st place) or ddp, or model.precision=fp32")
    return Session(cfg, fold, work, device, amp_dtype, tokenizer, fmt, rank=rank, world=world, resume=resume, eval_fmt=eval_fmt,
                   strategy=strategy)


def resolve_init_from(cfg: Config, fold: int) -> Config:
    """``model.init_from`` with ``{fold}`` filled in (runs/stage2/fold_{fold} -> runs/stage2/fold_3), checked to exist
    before any data is read; the fold's config.yaml records the resolved path."""
    from .modeling import init_source

    if not cfg.model.init_from:
        return cfg
    model = cfg.model.model_copy(update={"init_from": cfg.model.init_from.replace("{fold}", str(fold))})
    init_source(model)  # one clear line if it does not exist or is neither a fold nor a checkpoint
    return cfg.model_copy(update={"model": model})


STATS_FIELDS = ("kept", "total", "char_cut", "rounds_kept", "rounds_total")  # TruncationStats' per-row arrays


# Keys that may change between a checkpoint and --resume: they do not change how the fold trains (threads, how
# often to checkpoint, evaluation and inference batching, inference-only settings, the test file, the run's name,
# the tuning space). Every other key (lr, batch sizes, schedule, lora.*, model.*, seed, data...) would train the
# rest differently, and so would predict.max_length: validation formats rows at it, so changing it changes the
# scores early stopping compares and the OOF predictions written. A new key is refused until it is listed here.
RESUME_MAY_CHANGE = ("name", "data.test", "train.threads", "train.checkpoint_minutes", "train.eval_batch_size",
                     "predict.batch_size", "predict.tta", "predict.tta_share", "predict.time_budget_h", "predict.max_tokens",
                     "predict.quantization", "predict.precision", "predict.threads", "predict.engine", "tune.")


def check_resumed_config(cfg: Config, work: Path) -> None:
    """Refuse, in one line naming the keys, a --resume whose config would change the checkpoint's training.
    The fold's config.yaml is the checkpoint's: written when its training started, and rewritten on a resume
    only after this check passed (so only with changes that leave the training as it was)."""
    from .config import config_from_dict, read_yaml

    saved_path = work / "config.yaml"
    if not saved_path.is_file():  # removed by hand: only the checkpoint's own checks (shapes, steps) remain
        from .ui import warn

        warn(f"{saved_path} is missing: the resumed config cannot be compared with the checkpoint's")
        return
    saved = config_from_dict(read_yaml(saved_path), str(saved_path)).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    changed = [key for key in _changed_keys(saved, now)
               if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)]
    if changed:
        def short(v) -> str:
            r = repr(v)
            return r if len(r) <= 40 else r[:37] + "..."

        diff = ", ".join(f"{k} {short(_lookup(saved, k))} -> {short(_lookup(now, k))}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise KKError(f"--resume with a changed config: {diff}{more} would train the rest of {work} differently from "
                      f"its start; resume with the settings in {saved_path}, or start over with --force")


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (lists compared whole)."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def record_config(s: Session) -> None:
    """The fold's config.yaml: written only once the fold's rows load (a fold that cannot train leaves nothing)
    and, on --resume, only after check_resumed_config found nothing that changes the training."""
    from .io import write_text

    if s.main:
        s.work.mkdir(parents=True, exist_ok=True)
        write_text(s.work / "config.yaml", s.cfg.to_yaml())


def epoch_plan(s: Session, inputs: FoldInputs, epoch: int) -> list[list[int]]:
    plan = plan_batches([len(x) for x in inputs.seqs], inputs.units, inputs.batch_size, s.cfg.seed, epoch, s.max_tokens, s.cfg.train.packing,
                        max_packed=s.max_packed)
    if s.world > 1:  # every rank the same number of micro-batches, or DDP would wait forever
        plan = plan[s.rank : len(plan) - len(plan) % s.world : s.world]
    return plan


def setup_training(s: Session, inputs: FoldInputs) -> None:
    """The model (seeded: LoRA and head initialisation are reproducible), AdamW, the schedule and the
    loss scaler; on --resume all of them, the RNG and the progress come back from the checkpoint."""
    import torch

    from .modeling import build_model

    if s.device.type == "cuda":  # before any weight is read: one line naming the knob if it cannot fit
        from .memory import check_fits

        check_fits(s.cfg, s.world, s.strategy, torch.cuda.get_device_properties(s.device).total_memory / 2**30)
    # Every fold starts from the same LoRA and head initialisation (seed, not seed + fold): averaging the folds'
    # lora_A and lora_B (kk merge --method factors) is then close to averaging their updates, whereas factors
    # drawn apart average to a model far from the fold ensemble. Dropout draws still differ per fold.
    seed_everything(s.cfg.seed)
    s.model = build_model(s.cfg, s.tokenizer, s.device, s.amp_dtype)
    seed_everything(s.cfg.seed + s.fold)
    s.model.train()
    s.wrapped = s.model
    if s.cfg.train.packing:
        from .modeling import check_packing

        check_packing(s.model)
        if s.world > 1 or s.strategy != "ddp":
            raise KKError("train.packing runs on one process (it calls the backbone directly, which DDP would not sync); "
                          "set train.packing=false for multi-GPU training")
        s.max_packed = packed_cap(s)
    s.max_tokens = resolve_train_budget(s, inputs)
    if s.strategy == "fsdp":
        shard_model(s.model, s.amp_dtype)
    elif s.world > 1 and s.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        s.wrapped = DistributedDataParallel(s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    tc = s.cfg.train
    micro_per_epoch = len(epoch_plan(s, inputs, 0))
    if micro_per_epoch == 0:
        raise KKError(f"too few training rows for {s.world} processes with batch size {inputs.batch_size}")
    s.steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    s.total_steps = min(tc.epochs * s.steps_per_epoch, tc.max_steps or math.inf)
    s.optimizer = torch.optim.AdamW(param_groups(s.model, tc), lr=tc.lr)
    s.scheduler = lr_scheduler(s.optimizer, tc.scheduler, int(tc.warmup_ratio * s.total_steps), s.total_steps)
    # fp16 needs loss scaling; bf16 and fp32 do not (DeepSpeed scales its own).
    s.scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16 and s.strategy == "ddp")
    if s.strategy == "deepspeed":
        s.wrapped, s.optimizer = deepspeed_engine(s, inputs.batch_size)
    if s.resume:
        load_checkpoint(s)
        check_resumed_progress(s, inputs)
        if s.main:
            from .ui import console

            console.print(f"resuming fold {s.fold} at step {s.state.step} (epoch {s.state.epoch + 1})")
    s.rng = _rng_state()


def shard_model(model, amp_dtype) -> None:
    """FSDP2 (torch's ``fully_shard``): each transformer layer a unit, then the rest; fp32 shards kept for AdamW,
    computed in ``amp_dtype`` (gradients reduced in fp32)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .modeling import classifier_of

    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
    classes = set(getattr(classifier_of(model), "_no_split_modules", None) or ())  # transformers' layer classes
    layers = [m for m in model.modules() if type(m).__name__ in classes] or \
        [m for seq in model.modules() if isinstance(seq, torch.nn.ModuleList) for m in seq]  # encoders that name none
    for module in layers:
        fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def deepspeed_json(key: str) -> tuple[Path, dict]:
    """train.deepspeed: a shipped key (configs/deepspeed/<key>.json) or a JSON file's path, read."""
    import json

    path = Path(key) if key.endswith(".json") else Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{key}.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KKError(f"train.deepspeed {key}: cannot read {path} ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, dict):
        raise KKError(f"train.deepspeed {key}: {path} is not a JSON object")
    return path, {k: v for k, v in conf.items() if not k.startswith("_")}  # "_comment": the file's notes


def deepspeed_engine(s: Session, batch_size: int):
    """``deepspeed.initialize`` with the JSON train.deepspeed names; kagglekit's batch, accumulation, clipping and
    precision fill the keys its loop depends on."""
    import deepspeed
    import torch

    conf, tc = deepspeed_json(s.cfg.train.deepspeed)[1], s.cfg.train
    conf.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=tc.grad_accum,
                gradient_clipping=tc.max_grad_norm, bf16={"enabled": s.amp_dtype == torch.bfloat16},
                fp16={"enabled": s.amp_dtype == torch.float16})
    return deepspeed.initialize(model=s.model, optimizer=s.optimizer, config=conf)[:2]


def forward_logits(s: Session, seqs, segs=None):
    """One micro-batch's logits: padded to its longest row, or (train.packing) one padding-free row."""
    import torch

    from .engine import pad_batch, set_segments

    # FSDP (MixedPrecisionPolicy) and DeepSpeed (bf16/fp16) run the model in the half precision themselves.
    with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None and s.strategy == "ddp"):
        if s.cfg.train.packing:
            from .modeling import packed_logits

            return packed_logits(s.model, seqs, s.device)
        # Page-locked host tensors copied without blocking: the copy overlaps the GPU's work on the last batch.
        ids, mask, *seg = pad_batch(seqs, s.tokenizer.pad_token_id, pin=s.device.type == "cuda", segs=segs)
        if seg:
            set_segments(s.model, seg[0].to(s.device))
        return s.wrapped(input_ids=ids.to(s.device, non_blocking=True), attention_mask=mask.to(s.device, non_blocking=True)).logits


def packed_cap(s: Session) -> int:
    """The longest a packed row may be. With flash-attention's varlen kernels (packing on a GPU) attention
    memory is linear in the row: no cap beyond the budget. Without them (SDPA/eager: CPU runs and tests)
    every packed row attends through a dense L x L mask, quadratic in its length: capped at model.max_length,
    a packed row costs no more attention than one padded row could."""
    from .modeling import classifier_of

    attn = getattr(classifier_of(s.model).config, "_attn_implementation", None) or "eager"
    return 0 if attn.startswith("flash_attention") else s.cfg.model.max_length


def resolve_train_budget(s: Session, inputs: FoldInputs) -> int:
    """``train.max_tokens`` as a number. ``auto`` runs one forward and backward pass of the longest training
    row on the GPU and fills 80% of the free memory (0, i.e. rows, on CPU). The number is saved with the
    checkpoint folder together with the GPU it was measured on, so --resume replays the same batches even if
    free memory changed; resumed on another GPU (an H100 run continued on a T4), the budget is measured again
    and the saved batches run in as many pieces as the smaller GPU needs (the same gradients)."""
    import json

    import torch

    from . import batching

    budget = s.cfg.train.max_tokens
    if budget != "auto":
        return int(budget)
    saved = s.ckpt_dir / "batching.json"
    here = batching.device_signature(s.device)
    kept = None
    if s.resume and saved.is_file():
        record = json.loads(saved.read_text())
        kept = int(record["max_tokens"])
        if record.get("device", here) == here:  # older files name no device: the same one, as far as we know
            return kept
    longest = max(range(len(inputs.seqs)), key=lambda i: len(inputs.seqs[i]))

    def probe(rows, length):
        try:
            logits = forward_logits(s, [inputs.seqs[longest]] * rows,
                                    [inputs.segs[longest]] * rows if inputs.segs is not None else None)
            logits.float().sum().backward()
        finally:  # also after an out-of-memory error: no half-made gradient stays for the next probe
            s.model.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):  # the probe's dropout draws nothing
        budget = batching.auto_max_tokens(probe, len(inputs.seqs[longest]), s.device) or 0
    if s.world > 1:  # every rank plans the same batches: the smallest budget wins
        import torch.distributed as dist

        t = torch.tensor([budget], device=s.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        budget = int(t.item())
    from .ui import console

    if kept is not None:
        # The run's batches stay what they were (--resume continues the same plan); on a smaller GPU each runs
        # in enough pieces to fit what was measured here.
        s.pieces = 1 << max(0, math.ceil(math.log2(kept / budget))) if kept and budget else 1
        if s.main:
            console.print(f"train.max_tokens auto: resumed on another GPU ({record.get('device', {}).get('name')} -> {here['name']}): "
                          f"{budget or 'rows'} measured here; the run's batches of {kept} tokens run in {s.pieces} piece(s)")
        return kept
    if s.main:
        from .io import write_json

        s.ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(saved, {"max_tokens": budget, "device": here})
        console.print(f"train.max_tokens auto: {budget or 'rows (CPU)'}")
    return budget


# --- checkpoints ------------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    import torch

    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def sharded_io(s: Session, name: str, load: bool = False) -> None:
    """FSDP/DeepSpeed checkpoints: every rank writes (reads) its shard in ``checkpoint/<name>`` with
    torch.distributed.checkpoint or DeepSpeed's own; state.pt, written after, names the folder."""
    if s.strategy == "deepspeed":
        if load:
            return s.wrapped.load_checkpoint(str(s.ckpt_dir), tag=name, load_lr_scheduler_states=False)
        return s.wrapped.save_checkpoint(str(s.ckpt_dir), tag=name)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(s.model, s.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    (dcp.load if load else dcp.save)(state, checkpoint_id=str(s.ckpt_dir / name))
    if load:
        set_state_dict(s.model, s.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(s: Session) -> None:
    """Everything --resume needs, as tensors and plain values only (it loads with weights_only=True)."""
    old = s.shard_name
    if s.strategy in SHARDED:  # a new folder each time (a, b, a...): the one state.pt names stays whole until replaced
        s.shard_name = "sharded-b" if old == "sharded-a" else "sharded-a"
        sharded_io(s, s.shard_name)
    if not s.main:
        return
    import torch

    from .io import atomic_path
    from .modeling import trainable_state

    best = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.best.items() if isinstance(v, np.ndarray)}
    stats = s.best.get("stats")
    best.update({f"stats_{f}": torch.from_numpy(getattr(stats, f)) for f in STATS_FIELDS if getattr(stats, f, None) is not None})
    s.ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(s.ckpt_dir / "state.pt") as tmp:
        # rng: as it was when the current optimizer step began: a step interrupted half-way is redone with the same
        # dropout masks, so a resumed run equals an uninterrupted one.
        torch.save({"model": trainable_state(s.model) if s.strategy == "ddp" else {},  # sharded: in s.shard_name
                    "optimizer": s.optimizer.state_dict() if s.strategy == "ddp" else {},
                    "world": s.world, "sharded": s.shard_name, "scheduler": s.scheduler.state_dict(),
                    "scaler": s.scaler.state_dict(), "rng": s.rng["cpu"], "cuda_rng": s.rng["cuda"],
                    "progress": asdict(s.state), "best": best}, tmp)
    if old and old != s.shard_name:
        shutil.rmtree(s.ckpt_dir / old, ignore_errors=True)
    s.last_checkpoint = time.time()


def load_checkpoint(s: Session) -> None:
    import pickle

    import torch

    from .formatting import TruncationStats

    path = s.ckpt_dir / "state.pt"
    try:
        # weights_only: a checkpoint holds tensors and plain values; anything else (a crafted pickle) is refused.
        ck = torch.load(path, map_location="cpu", weights_only=True)
        check_checkpoint(s, ck, path)  # against this run, before any of it is loaded
        if s.strategy in SHARDED:
            sharded_io(s, ck["sharded"], load=True)
            s.shard_name = ck["sharded"]
        else:
            s.model.load_state_dict(ck["model"], strict=False)
            s.optimizer.load_state_dict(ck["optimizer"])
        s.scheduler.load_state_dict(ck["scheduler"])
        if ck["scaler"]:  # a bf16 (or fp32) run saved a disabled scaler's empty state: resumed in fp16, it starts afresh
            s.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        s.state = Progress(**ck["progress"])
        best = ck["best"]
        s.best = {k: v.numpy() for k, v in best.items() if not k.startswith("stats_")}
        if "stats_kept" in best:
            s.best["stats"] = TruncationStats(**{f: best[f"stats_{f}"].numpy() if f"stats_{f}" in best else None for f in STATS_FIELDS})
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        if "weights only load failed" in str(e).lower():  # torch's own advice (weights_only=False) would run its code
            why = "it holds objects other than tensors and plain values, and loading those could run code"
        else:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KKError(f"{path}: not a usable kagglekit checkpoint ({why}); start over with --force") from None
    s.last_checkpoint = time.time()


def _refuse_checkpoint(s: Session, why: str):
    raise KKError(f"{s.ckpt_dir / 'state.pt'}: not a usable kagglekit checkpoint ({why}); start over with --force")


def check_checkpoint(s: Session, ck, path) -> None:
    """A checkpoint's fields against this run before any is loaded, so a damaged or tampered one is one line:
    never a fold that claims a billion steps, nor a crash at the first step on a tensor of another shape."""
    import torch

    refuse = functools.partial(_refuse_checkpoint, s)
    if not isinstance(ck, dict):
        refuse(f"a {type(ck).__name__}, not a mapping")
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "rng", "progress", "best") if k not in ck]
    if missing:
        refuse(f"no {', '.join(missing)}")
    if ck.get("world", s.world) != s.world:
        raise KKError(f"{path}: saved by {ck['world']} processes, resumed by {s.world}: resume with the same number "
                      f"(torchrun --nproc_per_node {ck['world']}), or start over with --force")
    # Progress: plain counts, within what this run can reach.
    prog = ck["progress"]
    if not isinstance(prog, dict) or set(prog) - {f.name for f in fields(Progress)}:
        refuse("its progress record is not this version's")
    prog = {**asdict(Progress()), **prog}  # a field an older version did not write takes its default
    for key in ("epoch", "micro", "step", "samples", "best_step", "bad_evals", "evals"):
        v = prog[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            refuse(f"progress.{key} is {v!r}, not a count")
    for key, limit, what in (("step", s.total_steps, f"this run's {s.total_steps} optimizer steps"),
                             ("epoch", s.cfg.train.epochs, f"train.epochs {s.cfg.train.epochs}"),
                             ("best_step", prog["step"], f"progress.step {prog['step']}"),
                             ("evals", prog["step"] + 1, f"one evaluation per step ({prog['step']} steps)"),
                             ("bad_evals", prog["evals"], f"progress.evals {prog['evals']}")):
        if prog[key] > limit:
            refuse(f"progress.{key} {prog[key]} is beyond {what}")
    for key in ("best_loss", "train_seconds"):
        v = prog[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or (key == "train_seconds" and math.isinf(v)):
            refuse(f"progress.{key} is {v!r}")
    if not isinstance(prog["log"], list) or len(prog["log"]) != prog["step"] or not all(isinstance(r, dict) for r in prog["log"]):
        refuse(f"progress.log does not hold one row per step ({prog['step']} steps)")
    sched = ck["scheduler"]
    if not isinstance(sched, dict) or sched.get("last_epoch") != prog["step"]:
        refuse(f"the learning-rate schedule is at step {sched.get('last_epoch') if isinstance(sched, dict) else None!r}, "
               f"the progress at step {prog['step']}")
    if not isinstance(ck["best"], dict) or not all(isinstance(v, torch.Tensor) for v in ck["best"].values()):
        refuse("its best evaluation is damaged")
    if s.strategy in SHARDED:
        return  # the shards are checked by their own loader
    # The trained tensors: exactly this config's trainable parameters, each of its shape.
    expected = {n: p.shape for n, p in s.model.named_parameters() if p.requires_grad}
    model = ck["model"]
    if not isinstance(model, dict) or set(model) != set(expected):
        names = set(model) if isinstance(model, dict) else set()
        refuse(f"its weights are not this model's trainable parameters: {len(set(expected) - names)} missing, "
               f"{len(names - set(expected))} unexpected")
    for name, shape in expected.items():
        t = model[name]
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            refuse(f"{name} has shape {tuple(getattr(t, 'shape', ()))}, the model's is {tuple(shape)}")
    # AdamW's moments: one entry per parameter of the optimizer, each of its parameter's shape.
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    opt = ck["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        refuse("its optimizer state is damaged")
    for i, st in opt["state"].items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(st, dict):
            refuse(f"optimizer state for a parameter {i!r} this model does not have")
        for key in ("exp_avg", "exp_avg_sq"):
            t = st.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != params[i].shape):
                refuse(f"optimizer {key} of parameter {i} has shape {tuple(getattr(t, 'shape', ()))}, "
                       f"the parameter's is {tuple(params[i].shape)}")


def check_resumed_progress(s: Session, inputs: FoldInputs) -> None:
    """What a checkpoint says against this fold's batches and validation rows (known only once they are built)."""
    state, tc = s.state, s.cfg.train
    if state.epoch < tc.epochs:
        n = len(epoch_plan(s, inputs, state.epoch))
        if state.micro > n or (state.micro < n and state.micro % tc.grad_accum):
            _refuse_checkpoint(s, f"progress.micro {state.micro} is not the start of an optimizer step of epoch "
                                  f"{state.epoch + 1}'s {n} micro-batches")
    rows = (len(inputs.val_df), inputs.targets.shape[1])
    for key in ("probs", "probs_ab", "probs_ba"):
        if key in s.best and s.best[key].shape != rows:
            _refuse_checkpoint(s, f"its best {key} has shape {s.best[key].shape}, the validation rows' is {rows}")


# --- the loop ---------------------------------------------------------------------------------------------------------


def evaluate(s: Session, inputs: FoldInputs, bar=None) -> float:
    """Validation log loss with swap TTA (returned), and the task's metric (``s.last_metric``: log loss
    again for LMSYS, accuracy for WSDM); the best adapter so far by the task's metric is what the fold keeps."""
    from .metrics import log_loss
    from .modeling import save_model

    state, loss, value, task, improved = s.state, None, None, s.task, False
    res = predict_validation(s, inputs.val_df, bar)
    if s.main:
        labels = inputs.val_df["label"].to_numpy()
        loss = log_loss(res["probs"], labels)
        value = task.metric(res["probs"], labels)
        if task.improves(loss, value, state.best_loss, state.best_metric):
            state.best_loss, state.best_metric, state.best_step, state.bad_evals = loss, value, state.step, 0
            s.best.update(probs=res["probs"], probs_ab=res["probs_ab"], probs_ba=res["probs_ba"], stats=res["stats"])
            improved = True
        else:
            state.bad_evals += 1
    s.model.train()
    if s.world > 1:  # every rank takes rank 0's verdict, so early stopping is decided once
        import torch.distributed as dist

        shared = [loss, value, state.best_loss, state.best_metric, state.best_step, state.bad_evals, improved]
        dist.broadcast_object_list(shared, src=0)
        loss, value, state.best_loss, state.best_metric, state.best_step, state.bad_evals, improved = shared
    if improved:
        state_dict = full_state_dict(s)  # every rank, before rank 0 writes
        if s.main:
            save_model(s.model, s.tokenizer, s.work, state_dict)
    state.evals += 1
    s.last_metric = value
    return loss


def full_state_dict(s: Session) -> dict | None:
    """Sharded weights gathered whole on rank 0 (a collective: every rank calls it) for one ordinary model folder;
    None where every rank holds them whole (one process, DDP, ZeRO-2)."""
    if s.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(s.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if s.strategy == "deepspeed" and s.wrapped.zero_optimization_stage() == 3:
        return s.wrapped._zero3_consolidated_16bit_state_dict()
    return None


def predict_validation(s: Session, val_df, bar=None) -> dict | None:
    """The validation rows' probabilities with swap TTA (:func:`kagglekit.inference.predict_tta`), tokenized once for
    the whole training (the session's token cache). Under DDP every rank predicts every N-th row (rows come in file
    order, so each gets a like share of long and short ones) and rank 0 gathers them in order: the ranks share the
    work instead of waiting for rank 0 in a collective that NCCL's watchdog would abort. None on the other ranks.
    FSDP and ZeRO forwards are collective (each gathers the layers' shards): there every rank predicts every row."""
    from .engine import HFEngine
    from .inference import TokenCache, predict_tta

    split = s.world if s.strategy == "ddp" else 1
    if s.val is None:  # an engine over the model in training
        rows = np.arange(s.rank % split, len(val_df), split)
        cfg = s.cfg.model_copy(update={"predict": s.cfg.predict.model_copy(update={"batch_size": s.cfg.train.eval_batch_size})})
        s.val = (rows, val_df if split == 1 else val_df.iloc[rows].reset_index(drop=True), TokenCache(),
                 HFEngine.live(s.model, s.eval_fmt or s.fmt, cfg, s.device, s.amp_dtype, s.task))
    rows, val_part, cache, engine = s.val
    task = bar.add_task(f"fold {s.fold} eval", total=2 * len(val_part), status="") if bar is not None else None
    part = predict_tta(engine, None, val_part, True, cache, (lambda k: bar.advance(task, k)) if bar else None, f"fold {s.fold} eval")
    if bar is not None:
        bar.remove_task(task)
    if split == 1:
        return part if s.main else None
    import torch.distributed as dist

    st = part["stats"]
    share = {"rows": rows, "probs": part["probs"], "probs_ab": part["probs_ab"], "probs_ba": part["probs_ba"],
             **{f: getattr(st, f) for f in STATS_FIELDS if getattr(st, f) is not None}}
    gathered = [None] * s.world if s.main else None
    dist.gather_object(share, gathered, dst=0)
    return assemble_shares(gathered, len(val_df)) if s.main else None


def assemble_shares(shares: list[dict], n: int) -> dict:
    """The ranks' shares of a prediction (``rows`` and per-row arrays) put back in row order."""
    from .formatting import TruncationStats

    out = {}
    for key in ("probs", "probs_ab", "probs_ba", *STATS_FIELDS):
        if key not in shares[0]:
            continue  # an optional truncation field (char_cut, rounds) this layout does not record
        first = shares[0][key]
        out[key] = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for share in shares:
            out[key][share["rows"]] = share[key]
    out["stats"] = TruncationStats(**{f: out.pop(f) for f in STATS_FIELDS if f in out})
    return out


def _evaluate_into(s: Session, inputs: FoldInputs, row: dict, bar=None) -> float:
    """Evaluate; the log row gets the val log loss (and the task's metric when it is another); returns
    the task's metric, what early stopping and ``kk tune`` go by."""
    row["val_loss"] = evaluate(s, inputs, bar)
    if s.task.metric.name == "log_loss":
        return row["val_loss"]
    row[f"val_{s.task.metric.name}"] = s.last_metric
    return s.last_metric


def _end_of_step(s: Session, inputs: FoldInputs, bar, on_eval, on_step) -> bool:
    """After an optimizer step (or on resume, a step whose evaluation was interrupted): evaluate when due,
    decide early stopping, checkpoint, call back. Returns whether training is done."""
    tc, state = s.cfg.train, s.state
    row = state.log[-1]
    value = None
    if state.pending_eval:
        value = _evaluate_into(s, inputs, row, bar)
        state.pending_eval = False
        if tc.patience and state.bad_evals >= tc.patience:
            state.stopped_early = True
    done = state.step >= s.total_steps or state.stopped_early
    stop, due = _any_rank(s, s.stop_requested, bool(tc.checkpoint_minutes) and time.time() - s.last_checkpoint >= 60 * tc.checkpoint_minutes)
    if row["val_loss"] is not None:
        save_checkpoint(s)
        if on_eval is not None:
            on_eval(state.step, value)
    elif due:
        save_checkpoint(s)  # preemption costs at most a few minutes, whatever eval_every says
    if on_step is not None:
        on_step(state.step)
    if stop and not done:
        raise KeyboardInterrupt  # on every rank at once, so the sharded checkpoint is written together
    return done


def _any_rank(s: Session, *flags: bool) -> list[bool]:
    """Sharded runs: each flag true on every rank if it is on one (checkpoints and stops are collective there)."""
    if s.strategy not in SHARDED or s.world == 1:
        return list(flags)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=s.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


@contextlib.contextmanager
def _grad_sync(s: Session, sync: bool):
    """Gradients are averaged across processes once per optimizer step, on its last backward: DDP's no_sync,
    FSDP2's set_requires_gradient_sync, DeepSpeed's accumulation boundary."""
    if s.strategy == "ddp" and s.world > 1 and not sync:
        with s.wrapped.no_sync():
            yield
        return
    if s.strategy == "fsdp":
        s.model.set_requires_gradient_sync(sync)
    elif s.strategy == "deepspeed":
        s.wrapped.set_gradient_accumulation_boundary(sync)
    yield


def _optimizer_step(s: Session, params) -> None:
    """Clip, step, schedule; DeepSpeed's engine clips (gradient_clipping) and steps its sharded optimizer itself."""
    import torch

    if s.strategy == "deepspeed":
        s.wrapped.step()
    else:
        s.scaler.unscale_(s.optimizer)
        if s.cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, s.cfg.train.max_grad_norm)
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)


def training_loss(logits, soft, hard, tc):
    """Summed training loss of a micro-batch (the caller normalises per sequence), per row (``train.distill``:
    weight w, temperature T)::

        (1 - w) * CE(hard label, smoothed by train.label_smoothing) + w * T^2 * KL(teacher at T || student at T)

    with the teacher at T = softmax(log p / T) and the student at T = softmax(logits / T); T^2 keeps the gradient
    scale of the KL term independent of T (Hinton et al., 2015). A row with only a hard label uses the cross-entropy
    alone, a row with only a teacher's probabilities (pseudo-labelled extra rows) the KL term alone.
    ``hard``: -1 where a row has no hard label; ``soft``: NaN rows where a row has none, or None when no row has any.
    """
    import torch
    import torch.nn.functional as F

    has_hard = hard >= 0
    ce = F.cross_entropy(logits, hard.clamp(min=0), label_smoothing=tc.label_smoothing, reduction="none")
    if soft is None:
        return (ce * has_hard).sum()
    w, t = tc.distill.weight, tc.distill.temperature
    has_soft = ~torch.isnan(soft).any(dim=1)
    # Rows without a teacher get a placeholder distribution; their KL term is multiplied by 0 below.
    teacher = torch.where(has_soft[:, None], soft, torch.full_like(soft, 1.0 / soft.shape[1]))
    teacher_t = torch.softmax(torch.log(teacher.clamp_min(torch.finfo(teacher.dtype).tiny)) / t, dim=1)
    student_t = torch.log_softmax(logits / t, dim=1)
    kl = F.kl_div(student_t, teacher_t, reduction="none").sum(dim=1) * (t * t)
    one = ce.new_ones(())
    w_hard = torch.where(has_soft, one * (1.0 - w), one) * has_hard
    w_soft = torch.where(has_hard, one * w, one) * has_soft
    return (w_hard * ce + w_soft * kl).sum()


def _accumulate(s: Session, inputs: FoldInputs, targets, batch: list[int], n_group: int, syncs: bool):
    """Forward and backward of one micro-batch, in ``s.pieces`` pieces (after an out-of-memory error); returns
    its summed loss, still on the device. The loss is a per-sequence sum divided by the step's sequence count,
    so the pieces' gradients add up to the whole micro-batch's. ``syncs``: the step's last micro-batch, whose
    (last piece's) backward lets DDP average the gradients across ranks."""
    tc, (soft, hard) = s.cfg.train, targets
    pieces = np.array_split(np.asarray(batch), min(s.pieces, len(batch)))
    total = 0.0
    for k, piece in enumerate(pieces):
        rows = piece.tolist()
        with _grad_sync(s, syncs and k == len(pieces) - 1):
            logits = forward_logits(s, [inputs.seqs[i] for i in rows], [inputs.segs[i] for i in rows] if inputs.segs is not None else None)
            loss = training_loss(logits.float(), soft[rows] if soft is not None else None, hard[rows], tc)
            if s.strategy == "deepspeed":  # the loss is already per step: not divided again by the accumulation
                s.wrapped.backward(loss / n_group, scale_wrt_gas=False)
            else:
                s.scaler.scale(loss / n_group).backward()
        total = total + loss.detach()
    return total


def _smaller_pieces(s: Session, inputs: FoldInputs, batch: list[int], group_start: int, group_seqs: int) -> None:
    """Out of GPU memory in the middle of an optimizer step: the step starts over from its first micro-batch,
    each micro-batch in twice as many pieces (the same gradients, the same plan, so --resume is unaffected).
    A sequence that does not fit alone, or a multi-GPU run (the other ranks already wait for this one's
    gradients), is one line naming what to lower."""
    import torch

    from .memory import OutOfMemory, free_memory
    from .ui import warn

    state = s.state
    s.optimizer.zero_grad(set_to_none=True)
    free_memory(s.device)
    where = f"step {state.step + 1} of fold {s.fold}"
    if s.world > 1:
        raise OutOfMemory(f"out of GPU memory at {where} on rank {s.rank}: lower train.batch_size or train.max_tokens"
                          f"{f' (the auto budget was {s.max_tokens})' if s.max_tokens else ''}")
    if s.pieces >= len(batch):
        longest = max(len(inputs.seqs[i]) for i in batch)
        raise OutOfMemory(f"out of GPU memory training one sequence of {longest} tokens at {where}: lower model.max_length, "
                          "or set model.gradient_checkpointing=true or model.quantization=4bit")
    s.pieces *= 2
    state.micro = group_start
    state.samples -= group_seqs
    torch.set_rng_state(s.rng["cpu"])  # the step's dropout starts where it started
    if s.rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s.rng["cuda"])
    warn(f"out of GPU memory at {where}: micro-batches now run in {s.pieces} pieces (the same gradients, slower; "
         "a lower train.batch_size or train.max_tokens avoids this)")


def fit(s: Session, inputs: FoldInputs, on_eval=None, on_step=None) -> None:
    """The training loop, top to bottom: micro-batches, optimizer steps, evaluations, checkpoints."""
    import torch

    from .memory import is_oom
    from .modeling import precision_hint
    from .ui import progress

    tc, state = s.cfg.train, s.state
    # On the device once: each micro-batch's targets are indexed there, never copied from the host.
    soft, hard = inputs.loss_targets()
    targets = (soft.to(s.device) if soft is not None else None, hard.to(s.device))
    params = [p for p in s.model.parameters() if p.requires_grad]
    eval_every = tc.eval_every or s.steps_per_epoch
    s.last_checkpoint = s.last_checkpoint or time.time()
    done = state.step >= s.total_steps or state.stopped_early
    # The step's loss adds up on the device: reading it stalls the host until the GPU catches up, so it is
    # read (and checked for overflow) once per optimizer step, not once per micro-batch.
    group_loss, group_seqs = torch.zeros((), device=s.device), 0
    t_start = time.time() - state.train_seconds
    with progress(disable=not s.main) as bar, sigterm_as_interrupt(s if s.strategy in SHARDED and s.world > 1 else None):
        task = bar.add_task(f"fold {s.fold}", total=s.total_steps, completed=state.step, status="")
        try:
            if state.pending_eval and not done:  # interrupted during an evaluation: finish that step first
                done = _end_of_step(s, inputs, bar, on_eval, on_step)
            while not done and state.epoch < tc.epochs:
                plan = epoch_plan(s, inputs, state.epoch)
                while state.micro < len(plan) and not done:
                    group_start = state.micro - state.micro % tc.grad_accum
                    group = plan[group_start : group_start + tc.grad_accum]
                    n_group = sum(len(b) for b in group)  # sequences in this optimizer step
                    batch = plan[state.micro]
                    try:
                        loss = _accumulate(s, inputs, targets, batch, n_group, syncs=state.micro - group_start + 1 == len(group))
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        loss = None  # handled below, once the error (and the tensors its traceback holds) is gone
                    if loss is None:
                        _smaller_pieces(s, inputs, batch, group_start, group_seqs)
                        group_loss, group_seqs = torch.zeros((), device=s.device), 0
                        continue
                    group_loss = group_loss + loss
                    group_seqs += len(batch)
                    state.micro += 1
                    state.samples += len(batch)
                    if state.micro - group_start < len(group):
                        continue  # keep accumulating
                    step_loss = group_loss.item()
                    if not math.isfinite(step_loss):
                        raise KKError(f"non-finite loss at step {state.step + 1} of fold {s.fold}{precision_hint(s.device, s.amp_dtype)}")
                    _optimizer_step(s, params)  # one per grad_accum micro-batches (an epoch's last may be shorter)
                    state.step += 1
                    state.train_seconds = time.time() - t_start
                    s.rng = _rng_state()  # where the next step starts
                    row = {"step": state.step, "epoch": state.epoch + 1, "lr": s.scheduler.get_last_lr()[0],
                           "train_loss": step_loss / group_seqs, "val_loss": None}
                    group_loss, group_seqs = torch.zeros((), device=s.device), 0
                    state.log.append(row)  # logged before evaluating: a Ctrl-C mid-evaluation keeps the row
                    end_of_epoch = state.micro == len(plan)
                    state.pending_eval = (state.step % eval_every == 0 or state.step >= s.total_steps
                                          or (tc.eval_every == 0 and end_of_epoch))
                    rate = state.samples / max(state.train_seconds, 1e-9)
                    bar.update(task, completed=state.step, status=f"loss {row['train_loss']:.4f} lr {row['lr']:.2e} {rate:.1f} samples/s")
                    done = _end_of_step(s, inputs, bar, on_eval, on_step)
                    if row["val_loss"] is not None:
                        bar.update(task, status=_eval_status(s, row))
                if state.micro >= len(plan):
                    state.epoch, state.micro = state.epoch + 1, 0
        except KeyboardInterrupt:
            # Roll back to the start of the optimizer step: half-accumulated gradients are discarded and the
            # checkpoint carries the RNG of that moment, so --resume redoes the step exactly.
            s.optimizer.zero_grad(set_to_none=True)
            state.micro -= state.micro % tc.grad_accum
            state.samples -= group_seqs
            save_checkpoint(s)
            retrain = s.work.name.endswith(".retrain")
            raise Interrupted(f"interrupted at step {state.step} of fold {s.fold}; checkpoint saved in {s.ckpt_dir}; "
                              f"continue with --resume{' --force' if retrain else ''}") from None
    if state.evals == 0:
        row = {"step": state.step, "epoch": state.epoch, "lr": 0.0, "train_loss": None}
        _evaluate_into(s, inputs, row)
        state.log.append(row)


def _eval_status(s: Session, row: dict) -> str:
    state, metric = s.state, s.task.metric.name
    if metric == "log_loss":
        return f"val {row['val_loss']:.4f} (best {state.best_loss:.4f} @ {state.best_step})"
    return f"val {s.task.metric.title} {row[f'val_{metric}']:.4f}, log loss {row['val_loss']:.4f} (best {state.best_metric:.4f} @ {state.best_step})"


# --- outputs ----------------------------------------------------------------------------------------------------------


def write_outputs(s: Session, inputs: FoldInputs) -> dict:
    """oof.csv, oof_no_tta.csv, train_log.csv and metrics.json of the best evaluation; the checkpoint goes."""
    import pandas as pd

    from .io import write_csv, write_json
    from .metrics import accuracy, log_loss, per_class_accuracy, prior_log_loss, swap_flip_rate
    from .modeling import classifier_of, init_record
    from .versions import library_versions

    if "probs" not in s.best:
        raise KKError(f"fold {s.fold}: the validation log loss was never finite; nothing to keep")
    out, state, val_df, task = s.work, s.state, inputs.val_df, s.task
    labels = val_df["label"].to_numpy()
    probs, probs_ab, probs_ba = s.best["probs"], s.best["probs_ab"], s.best["probs_ba"]
    write_csv(out / "oof.csv", task.prob_frame(val_df["id"], probs))
    write_csv(out / "oof_no_tta.csv", task.prob_frame(val_df["id"], probs_ab))
    metric = task.metric.name
    log_columns = ["step", "epoch", "lr", "train_loss", "val_loss"] + ([f"val_{metric}"] if metric != "log_loss" else [])
    write_csv(out / "train_log.csv", pd.DataFrame(state.log, columns=log_columns))
    wall = state.train_seconds
    metrics = {
        "fold": s.fold,
        # Which training made these weights: kk predict keys its cache by it and refuses to write into a fold
        # that a forced retrain replaced while it ran.
        "generation": uuid.uuid4().hex,
        "task": task.name, "metric": metric,
        "val_log_loss": log_loss(probs, labels), "val_log_loss_no_tta": log_loss(probs_ab, labels),
        "val_accuracy": accuracy(probs, labels), "val_accuracy_no_tta": accuracy(probs_ab, labels),
        f"val_{metric}": task.metric(probs, labels),  # the task's metric (one of the two above for lmsys and wsdm)
        "val_per_class_accuracy": per_class_accuracy(probs, labels, task.class_names),
        "swap_flip_rate": swap_flip_rate(probs_ab, probs_ba),
        "prior_log_loss": prior_log_loss(labels, task.n_classes),
        "best_step": state.best_step, "steps": state.step, "epochs_run": round(state.step / s.steps_per_epoch, 3),
        "stopped_early": state.stopped_early,
        "n_train": int(len(inputs.train_df)), "n_extra": int(inputs.n_extra), "extra_dropped": dict(inputs.extra_dropped),
        "n_val": int(len(val_df)),
        "wall_time_s": round(wall, 2),
        "train_samples_per_s": round(state.samples / max(wall, 1e-9), 3),
        "truncation": {"train": inputs.trunc.summary(), "val": s.best["stats"].summary()},
        "device": str(s.device),
        "attn_implementation": getattr(classifier_of(s.model).config, "_attn_implementation", None),
        "versions": library_versions(),
        "init_from": init_record(s.cfg.model),
    }
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(s.ckpt_dir, ignore_errors=True)
    return metrics


def _print_metrics(out: Path, metrics: dict) -> None:
    from .ui import console, table

    acc = metrics["metric"] == "accuracy"
    console.print(table(f"fold {metrics['fold']} ({metrics['task']}): {out}", ["metric", "value"], [
        ["val log loss (TTA)", metrics["val_log_loss"]],
        ["val log loss (no TTA)", metrics["val_log_loss_no_tta"]],
        ["class-prior log loss", metrics["prior_log_loss"]],
        ["accuracy (TTA)" if acc else "accuracy", metrics["val_accuracy"]],
        *([["accuracy (no TTA)", metrics["val_accuracy_no_tta"]]] if acc else []),
        ["swap flip rate", metrics["swap_flip_rate"]],
        ["best step / steps", f"{metrics['best_step']} / {metrics['steps']}"],
        ["rows truncated (train)", metrics["truncation"]["train"]["share_truncated"]],
        ["samples/s", metrics["train_samples_per_s"]],
    ]))


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
