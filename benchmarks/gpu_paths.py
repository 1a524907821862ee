"""The GPU-only paths of kagglekit (issue 19) run for real on a GPU, one table: what the test suite can only
simulate on CPU (tests/cudasim.py), here with real CUDA.

  qlora        `kk train` (fold 0, 4-bit QLoRA, LoRA, evaluation) + `kk predict` of a Gemma-2-architecture model
               (toy widths) on one GPU, through the CLI's own commands: device cuda:0, eager attention, finite
  oom-train    a real out-of-memory: the allocator capped (torch.cuda.set_per_process_memory_fraction) between what
               one row and a full micro-batch need; training retries in pieces and ends where the uncapped run ends
  oom-predict  inference under the same cap with big batches: retried in pieces, logits equal to the uncapped run's
  fp16-recompute  weights in fp16 whose head really overflows fp16 (its weights scaled up): every row recomputed in
               fp32, equal to an fp32 copy of the model
  4bit-recompute  the same with a 4-bit model: the recompute reaches the 4-bit layers and the head in fp32
  packing      train.packing: a packed training run with flash-attention-2 where it is installed (compute capability
               8.0+), else the one-line refusal
  predictor    Predictor over 2 folds: one fold model on the GPU at a time, memory back to the baseline after
  ddp          `torchrun --nproc_per_node 2 kk train` with sharded evaluation (only with 2+ GPUs)

On CPU (`--smoke`, what the test suite runs) the same checks run where they can: out-of-memory is injected from a
forward hook instead of a capped allocator, and the checks that need CUDA say so.

    python benchmarks/gpu_paths.py --record     # on the GPU (bitsandbytes for the 4-bit checks)
    python benchmarks/gpu_paths.py --smoke      # CPU, toy size
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, device_info, md_table, print_table, record

COLS = ["check", "result", "detail", "seconds"]
# Toy sizes: on a GPU big enough that activations, not the allocator's granularity, decide what fits under a cap;
# on CPU (--smoke, in the test suite) as small as the checks allow.
SIZES = {"gpu": dict(rows=240, hidden=256, max_length=512, infer_rows=128),
         "smoke": dict(rows=90, hidden=64, max_length=128, infer_rows=24)}
SIZE = SIZES["gpu"]


def kk(*args, torchrun: int = 0):
    """`kk ...` as a user runs it: the CLI itself, in this process (a result with exit_code, stdout, stderr), or
    under torchrun in processes of its own (a CompletedProcess with returncode) for DDP."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "-m", "kagglekit.cli", "--"]
        return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, KK_QUIET="1", PYTHONPATH=str(REPO)))
    from typer.testing import CliRunner

    from kagglekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def project(work: Path) -> Path:
    """Synthetic train/test rows, 3 folds, a tiny Llama and a Gemma-2 of the same toy size."""
    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model

    make_synthetic(SIZE["rows"], seed=1).to_csv(work / "train.csv", index=False)
    make_synthetic(24, seed=2, with_labels=False).to_csv(work / "test.csv", index=False)
    make_folds(load_train(work / "train.csv")[0], 3, 0).to_csv(work / "folds.csv", index=False)
    for arch in ("llama", "gemma2"):
        build_tiny_model(work / arch, arch, str(work / "train.csv"), vocab_size=600, hidden=SIZE["hidden"], layers=2, heads=4)
    return work


def config(work: Path, arch: str, *overrides: str):
    from kagglekit.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [f"data.train={work / 'train.csv'}", f"data.folds={work / 'folds.csv'}",
                                                         f"model.backbone={work / arch}", f"model.max_length={SIZE['max_length']}",
                                                         "train.epochs=1",
                                                         *overrides])


def cli_config(work: Path, arch: str, *overrides: str) -> list[str]:
    return ["--config", REPO / "configs" / "tiny.yaml", "--train", work / "train.csv", "--folds", work / "folds.csv",
            "--set", f"model.backbone={work / arch}", "--set", f"model.max_length={SIZE['max_length']}", "--set", "train.epochs=1",
            *[x for o in overrides for x in ("--set", o)]]


def check_qlora(work: Path, device) -> tuple[str, str]:
    try:
        import bitsandbytes  # noqa: F401
        quant = "4bit"
    except ImportError:
        quant = "none"
    run = work / "runs" / "qlora"
    r = kk("train", "--fold", "0", "--run", run, *cli_config(work, "gemma2", f"model.quantization={quant}", "train.max_steps=2"))
    if r.exit_code:
        return "FAILED", (r.stderr.strip().splitlines() or [repr(r.exception)])[-1][:160]
    m = json.loads((run / "fold_0" / "metrics.json").read_text())
    r = kk("predict", "--run", run, "--fold", "0", "--test", work / "test.csv")
    if r.exit_code:
        return "FAILED", "kk predict: " + (r.stderr.strip().splitlines() or [repr(r.exception)])[-1][:160]
    import pandas as pd

    p = pd.read_csv(run / "fold_0" / "test.csv").iloc[:, 1:].to_numpy()
    ok = m["device"] == str(device) and m["attn_implementation"] == "eager" and bool((abs(p.sum(1) - 1) < 1e-6).all())
    return ("ok" if ok else "FAILED"), f"{quant}, device {m['device']}, attention {m['attn_implementation']}, val log loss {m['val_log_loss']:.4f}"


@contextlib.contextmanager
def out_of_memory_between(device, one_row: int, sixteen_rows: int):
    """Out-of-memory errors for any micro-batch of more than 4 rows: on a GPU for real, the caching allocator
    capped between what one row and sixteen rows needed (measured peaks); on CPU raised from a forward hook
    (tests/cudasim.py). Yields the list of kagglekit's warnings (each retry announces itself there)."""
    from unittest import mock

    import torch

    import kagglekit.ui as ui

    seen = []
    real_warn = ui.warn
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ui, "warn", lambda msg: (seen.append(msg), real_warn(msg))))
        if device.type == "cuda":
            cap = one_row + 4 * (sixteen_rows - one_row) / 15
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
            stack.callback(torch.cuda.set_per_process_memory_fraction, 1.0, device)
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from cudasim import oom_after_load

            stack.enter_context(oom_after_load(when=lambda ids: ids.shape[0] > 4))
        yield seen


def check_oom(work: Path, device) -> list[list]:
    """Training and inference that run out of memory retry in pieces and end where the unconstrained runs end."""
    import numpy as np
    import torch

    from kagglekit.engine import infer_logits
    from kagglekit.predict import FoldModel
    from kagglekit.train import train_fold

    cuda = device.type == "cuda"
    base = ["train.max_steps=2", "train.grad_accum=1", "train.eval_every=2", "train.swap_augment=false", "lora.dropout=0",
            "train.eval_batch_size=1", "predict.max_tokens=0"]
    t = time.time()
    peaks = {1: 0, 16: 0}
    for b in (1, 16) if cuda else (16,):  # what one row and a full micro-batch of training need, measured
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        plain = train_fold(config(work, "llama", *base, f"train.batch_size={b}"), 0, work / "runs" / f"plain{b}")
        peaks[b] = torch.cuda.max_memory_allocated(device) if cuda else 0
    fm = FoldModel(work / "runs" / "plain16" / "fold_0")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, fm.model.config.vocab_size, size=SIZE["max_length"]).tolist() for _ in range(SIZE["infer_rows"])]
    want = infer_logits(fm.model, seqs, fm.tokenizer.pad_token_id, len(seqs), device, fm.dtype)
    fm.release()
    rows = []
    with out_of_memory_between(device, peaks[1], peaks[16]) as seen:
        try:
            capped = train_fold(config(work, "llama", *base, "train.batch_size=16"), 0, work / "runs" / "capped")
            same = abs(capped["val_log_loss"] - plain["val_log_loss"]) < 1e-3
            rows.append(["oom-train", "ok" if same and seen else "FAILED",
                         f"{len(seen)} retries, up to {seen[-1].split(' run in ')[-1].split(' pieces')[0] if seen else 1} pieces; "
                         f"val log loss {capped['val_log_loss']:.5f} vs {plain['val_log_loss']:.5f} unconstrained",
                         f"{time.time() - t:.0f}"])
        except Exception as e:  # reported, and the other checks still run
            return [["oom-train", "FAILED", f"{type(e).__name__}: {str(e)[:140]}", f"{time.time() - t:.0f}"]]
        t, n_before = time.time(), len(seen)
        try:
            fm = FoldModel(work / "runs" / "plain16" / "fold_0")
            got = infer_logits(fm.model, seqs, fm.tokenizer.pad_token_id, len(seqs), device, fm.dtype)
            fm.release()
        except Exception as e:
            return rows + [["oom-predict", "FAILED", f"{type(e).__name__}: {str(e)[:140]}", f"{time.time() - t:.0f}"]]
    err = float(np.abs(got - want).max())
    rows.append(["oom-predict", "ok" if err < 2e-2 and len(seen) > n_before else "FAILED",
                 f"{len(seen) - n_before} retries; max |logit difference| {err:.1e} vs unconstrained", f"{time.time() - t:.0f}"])
    return rows


def check_recompute(work: Path, device, quant: str) -> tuple[str, str]:
    """A head whose fp16 output really overflows (its weights scaled up): rows recomputed in fp32."""
    import numpy as np
    import torch

    from kagglekit.engine import infer_logits
    from kagglekit.modeling import load_backbone, load_tokenizer

    if quant == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "skipped", "bitsandbytes is not installed"
    cfg = config(work, "llama", f"model.quantization={quant}")
    tok = load_tokenizer(cfg.model.backbone)
    model = load_backbone(cfg.model, tok, device, torch.float16, weight_dtype=torch.float16 if quant == "none" else None).eval()
    with torch.no_grad():
        w = model.score.weight
        w.copy_(torch.sign(torch.randn_like(w, dtype=torch.float32)).to(w.dtype) * 6e4)  # |logit| ~ 6e4 x sqrt(hidden): inf in fp16
    head_in = []
    model.score.register_forward_hook(lambda m, a, o: head_in.append(a[0].dtype))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, model.config.vocab_size, size=int(n)).tolist() for n in rng.integers(20, SIZE["max_length"], size=8)]
    counts: dict = {}
    got = infer_logits(model, seqs, tok.pad_token_id, 4, device, torch.float16, counts=counts)
    detail = f"{counts.get('fp32_rows', 0)} of {len(seqs)} rows recomputed; head input {str(head_in[-1]).replace('torch.', '')}"
    ok = np.isfinite(got).all() and counts.get("fp32_rows") == len(seqs) and head_in[-1] == torch.float32
    if quant == "none":
        ref = copy.deepcopy(model).float()
        with torch.no_grad():
            want = np.stack([ref(input_ids=torch.tensor([s], device=device)).logits[0].float().cpu().numpy() for s in seqs])
        rel = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
        ok = ok and rel < 1e-3
        detail += f"; max relative difference from an fp32 copy {rel:.1e}"
    return ("ok" if ok else "FAILED"), detail


def check_packing(work: Path, device) -> tuple[str, str]:
    from kagglekit.errors import KKError
    from kagglekit.train import train_fold

    try:
        m = train_fold(config(work, "llama", "train.packing=true", "train.max_tokens=2048", "train.max_steps=3",
                              "model.precision=auto"), 1, work / "runs" / "packed")
    except KKError as e:
        refused = "needs flash-attention-2" in str(e)
        return ("ok" if refused and device.type == "cuda" else "FAILED"), f"refused in one line: {str(e)[:100]}"
    return "ok", f"trained {m['steps']} steps, attention {m['attn_implementation']}"


def check_predictor(work: Path, device) -> tuple[str, str]:
    import torch

    from kagglekit.predict import Predictor
    from kagglekit.train import train_fold

    run = work / "runs" / "plain16"  # fold 0 trained by the out-of-memory check; one more fold
    train_fold(config(work, "llama", "train.max_steps=1"), 1, run)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    res = Predictor.from_run(run).predict_one("What is 2+2?", "4", "5")
    after = torch.cuda.memory_allocated(device) if cuda else 0
    ok = abs(sum(res.values()) - 1) < 1e-6 and after - before < 1 << 20
    return ("ok" if ok else "FAILED"), f"GPU memory after / before: {after / 2**20:.1f} / {before / 2**20:.1f} MiB" if cuda else "CPU"


def check_ddp(work: Path) -> tuple[str, str]:
    import torch

    if torch.cuda.device_count() < 2:
        return "skipped", f"{torch.cuda.device_count()} GPU(s): needs 2"
    run = work / "runs" / "ddp"
    r = kk("train", "--fold", "1", "--run", run, *cli_config(work, "llama", "train.max_steps=4", "train.grad_accum=2",
                                                              "train.eval_every=2"), torchrun=2)
    if r.returncode:
        return "FAILED", (r.stderr.strip().splitlines() or ["?"])[-1][:160]
    m = json.loads((run / "fold_1" / "metrics.json").read_text())
    return "ok", f"2 ranks, {m['steps']} steps, val log loss {m['val_log_loss']:.4f} (rows gathered from both ranks)"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, toy size (the test suite)")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    SIZE.update(SIZES["smoke" if args.smoke else "gpu"])
    os.environ.setdefault("KK_QUIET", "1")  # the table is the output; no progress bars between its checks

    from kagglekit.modeling import device_and_dtype, quiet_libraries

    quiet_libraries()
    device, _ = device_and_dtype("auto")
    _, name, _ = device_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = project(Path(tmp))

        def run(check, fn, *a):
            t = time.time()
            try:
                status, detail = fn(*a)
            except Exception as e:  # one failing check must not hide the others
                status, detail = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}"
            rows.append([check, status, detail, f"{time.time() - t:.0f}"])

        run("qlora", check_qlora, work, device)
        t = time.time()
        try:
            rows.extend(check_oom(work, device))
        except Exception as e:  # the unconstrained runs it compares with failed
            rows.append(["oom-train", "FAILED", f"{type(e).__name__}: {str(e)[:140]}", f"{time.time() - t:.0f}"])
        run("fp16-recompute", check_recompute, work, device, "none")
        run("4bit-recompute", check_recompute, work, device, "4bit")
        run("packing", check_packing, work, device)
        run("predictor", check_predictor, work, device)
        run("ddp", check_ddp, work)
    title = f"GPU paths (issue 19) on {name}"
    print_table(title, COLS, rows)
    failed = [r[0] for r in rows if r[1] == "FAILED"]
    line = f"gpu paths: {len(rows) - len(failed)} of {len(rows)} ok or skipped" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    print(line)
    if args.record:
        record("gpu_paths", "python benchmarks/gpu_paths.py " + " ".join(argv), name, md_table(COLS, rows), line)
    if failed:
        raise SystemExit(1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
