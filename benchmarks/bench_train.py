"""Training speed against what competitors actually use, side by side, on the same token ids:

  hf-trainer  transformers.Trainer: train_sampling_strategy=group_by_length, DataCollatorWithPadding, eval off
  bare-loop   a plain PyTorch loop over pre-built, pre-padded batches of kagglekit's plan (the upper bound:
              no data handling at all inside the timed loop)
  kagglekit   kagglekit.train.fit itself (evaluation and checkpoints stubbed out), batches from plan_batches
  naive       (optional) shuffled rows, every sequence padded to max_length: the seed notebook
  bare-hf     (optional) the same bare loop over the HF Trainer's batches (transformers' LengthGroupedSampler):
              batching alone, for `--data sim --steps K` where K steps of the Trainer itself would be the
              longest batches of one mega-batch (it sorts each mega-batch longest first), not a sample of its epoch

Every contender runs the same model (LoRA r on kagglekit's targets, heads trained), AdamW, cosine schedule,
grad clipping, batch size and sequences, in its own process (peak memory is its own), for `--rounds`
interleaved rounds; the table shows the median and min-max of samples/s, the padding efficiency of the
batches it ran (real tokens / rows x longest), and peak memory (RSS on CPU, allocated on GPU). The first
optimizer step of each run is a warm-up and is not timed.

Data: `--data real` is the shared real rows formatted by kagglekit (tiny tokenizer) in both A/B orders;
`--data sim --rows 57477` draws sequences whose lengths follow the real distribution, at the competition's
full size, and `--steps K` times K steps of each contender's own full-size epoch (its batches are in
random order, so K steps are a fair sample of the epoch).

`host syncs/step` (kagglekit): how often the training loop makes the host wait for the device per optimizer
step, counted (torch's sync debug mode on a GPU; on CPU the same tensor reads, each a sync on a GPU), not timed.
`--grad-accum K` accumulates K micro-batches per step in kagglekit's loop (the other contenders step every batch):
a loop that reads the loss per micro-batch syncs K times a step, kagglekit's once.

Model FLOPs per sample (stated formula): FLOPs = (1 + b) * (2*N*T + 12*L*d*T^2), b = 1 (LoRA) or 2 (full),
for N non-embedding weights, T tokens, L layers, width d; MFU = useful FLOPs/s / device peak.

    python benchmarks/bench_train.py                                     # tiny model, the real rows, CPU
    python benchmarks/bench_train.py --data sim --rows 57477 --steps 24 --contenders bare-hf,bare-loop,kagglekit
    python benchmarks/bench_train.py --arch deberta-v3-base --data sim --rows 2000 --steps 20 --precision bf16
    python benchmarks/bench_train.py --contenders kagglekit --grad-accum 8 --steps 4 --rounds 1   # the host-sync row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    bench_sequences,
    build_model,
    device_info,
    dump_json,
    md_table,
    median_range,
    peak_memory_gib,
    print_table,
    record,
    sync,
    timed_fit,
    tiny_tokenizer,
)

CONTENDERS = ("hf-trainer", "bare-loop", "kagglekit")


def flops_per_sample(model, tokens: float, tokens_sq: float, lora: bool) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name and "lora_" not in name)
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * tokens_sq
    return (1 + (1 if lora else 2)) * (2 * n * tokens + attn)


def _wrap(base, args, cfg):
    if args.full:
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    from peft import LoraConfig, TaskType, get_peft_model

    from kagglekit.modeling import head_modules, lora_targets

    return get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                           target_modules=lora_targets(base, cfg.lora),
                                           modules_to_save=[m for m in head_modules(base) if m not in ("classifier", "score")] or None))


def child(args) -> dict:
    """One contender in this process: samples/s, real tokens/s, padding efficiency, peak memory."""
    import numpy as np
    import torch

    from kagglekit.batching import plan_batches
    from kagglekit.config import load_config
    from kagglekit.modeling import device_and_dtype

    torch.manual_seed(0)
    device, dtype = device_and_dtype(args.precision)
    work = Path(args.workdir)
    base, pad_id, vocab = build_model(args.arch, work)
    seqs, source = bench_sequences(args.data, args.max_length, vocab, work, args.rows, args.repeat)
    n = len(seqs)
    labels = np.random.default_rng(0).integers(0, 3, n)
    cfg = load_config(None, [f"lora.r={args.lora_r}", "lora.dropout=0", f"lora.enabled={str(not args.full).lower()}",
                             f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum if args.mode == 'kagglekit' else 1}", "train.epochs=1", "train.lr=1e-4",
                             f"train.max_steps={args.steps + 1 if args.steps else 0}", "train.label_smoothing=0",
                             "train.checkpoint_minutes=0", "train.patience=0", "train.swap_augment=false", "train.warmup_ratio=0.1",
                             f"model.max_length={args.max_length}", f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}"])
    base.to(device)
    if args.grad_ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _wrap(base, args, cfg)
    model.train()
    lengths = [len(s) for s in seqs]
    ran_lengths: list[list[int]] = []  # per timed batch (after the warm-up step): each row's real length

    if args.mode == "hf-trainer":
        from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

        tok = tiny_tokenizer(work)
        tok.pad_token_id = pad_id
        collate = DataCollatorWithPadding(tok)
        forwards: list[list[int]] = []  # per forward pass: the real length of each row

        def count(module, a, kw):  # what the model computes, whatever the data loader prefetches
            forwards.append(kw["attention_mask"].sum(1).tolist())

        model.register_forward_pre_hook(count, with_kwargs=True)

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return n

            def __getitem__(self, i):
                return {"input_ids": list(map(int, seqs[i])), "attention_mask": [1] * len(seqs[i]), "labels": int(labels[i]), "idx": i}

        def collator(features):
            for f in features:
                f.pop("idx")
            return collate(features)

        class Clock(TrainerCallback):
            t0 = None

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 1:
                    sync(device)
                    Clock.t0 = time.perf_counter()

        targs = TrainingArguments(
            output_dir=str(work / "hf"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            max_steps=args.steps + 1 if args.steps else -1, train_sampling_strategy="group_by_length", learning_rate=1e-4,
            lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to="none", use_cpu=device.type != "cuda", seed=0,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0, gradient_checkpointing=False,
        )
        Trainer(model=model, args=targs, train_dataset=DS(), data_collator=collator, callbacks=[Clock()]).train()
        sync(device)
        wall = time.perf_counter() - Clock.t0
        ran_lengths = forwards[1:]  # the first step is the warm-up
    elif args.mode == "kagglekit":
        import kagglekit.train as train_mod

        syncs: dict = {}
        s, inputs, wall, _ = timed_fit(cfg, model, seqs, labels, device, dtype, pad_id, work, syncs=syncs)
        ga = cfg.train.grad_accum
        ran_lengths = [[lengths[i] for i in b] for b in train_mod.epoch_plan(s, inputs, 0)[ga:s.total_steps * ga]]
    else:  # bare-loop / bare-hf (batches padded before the clock starts) or naive (fixed padding, file order)
        import torch.nn.functional as F

        from kagglekit.engine import pad_batch
        from kagglekit.train import lr_scheduler, param_groups

        plan = plan_batches(lengths, [[i] for i in range(n)], args.batch_size, cfg.seed, 0)  # exactly kagglekit's epoch
        if args.mode == "naive":
            order = np.random.default_rng(0).permutation(n)
            plan = [order[i:i + args.batch_size].tolist() for i in range(0, n, args.batch_size)]
        if args.mode == "bare-hf":  # the HF Trainer's batches (its own LengthGroupedSampler), through the same bare loop
            from bench_padding import hf_batches

            plan = hf_batches(lengths, args.batch_size, cfg.seed)
        steps = min(len(plan), args.steps + 1) if args.steps else len(plan)
        if args.steps and args.mode == "bare-hf":
            # HF orders each mega-batch longest first, so its first K steps are not a fair sample of its epoch:
            # K batches drawn uniformly from the whole epoch are (kagglekit's plan is shuffled already).
            pick = np.random.default_rng(1).choice(len(plan), size=steps, replace=False)
            plan = [plan[i] for i in pick]
        plan = plan[:steps]
        pad_to = args.max_length if args.mode == "naive" else None
        ready = [(*(t.to(device) for t in pad_batch([seqs[i] for i in b], pad_id, pad_to)), torch.as_tensor(labels[b]).to(device))
                 for b in plan]
        opt = torch.optim.AdamW(param_groups(model, cfg.train), lr=1e-4)
        sched = lr_scheduler(opt, "cosine", int(0.1 * steps), steps)
        params = [p for p in model.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        for k, (ids, mask, y) in enumerate(ready):
            if k == 1:
                sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        wall = time.perf_counter() - t0
        ran_lengths = [[lengths[i] for i in b] for b in plan[1:]]
    if not ran_lengths:
        sys.exit(f"{args.mode}: no optimizer step after the warm-up was timed (--rows {args.rows} is too few for "
                 f"--batch-size {args.batch_size} x --grad-accum {getattr(args, 'grad_accum', 1)}): give more rows")
    samples = sum(len(b) for b in ran_lengths)
    real_tokens = sum(sum(b) for b in ran_lengths)
    computed = sum(len(b) * (args.max_length if args.mode == "naive" else max(b)) for b in ran_lengths)
    eff = real_tokens / computed
    lora = not args.full
    useful = sum(flops_per_sample(model, n, n**2, lora) for b in ran_lengths for n in b)
    return {"mode": args.mode, "samples_s": samples / wall, "tokens_s": real_tokens / wall, "efficiency": eff,
            "peak_gib": peak_memory_gib(device), "useful_flops_s": useful / wall, "samples": samples, "source": source,
            "syncs_per_step": syncs["per_step"] if args.mode == "kagglekit" else None}


def run_child(base_cmd: list[str], mode: str, workdir: str) -> dict:
    proc = subprocess.run(base_cmd + ["--mode", mode, "--workdir", workdir], capture_output=True, text=True,
                          env=dict(os.environ, KK_QUIET="1"))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("KKBENCH ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("KKBENCH "):])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "deberta-v3-base"])
    ap.add_argument("--data", default="real", choices=["real", "sim"], help="the real rows, or simulated lengths (--rows)")
    ap.add_argument("--rows", type=int, default=0, help="--data sim: rows (x 2 orders); 57477 = the competition")
    ap.add_argument("--repeat", type=int, default=1, help="--data real: the rows this many times (scaling)")
    ap.add_argument("--steps", type=int, default=0, help="timed optimizer steps (0 = the whole epoch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median, min-max)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}, naive, bare-hf")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1, help="kagglekit's micro-batches per optimizer step (the host-sync row)")
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--mode", choices=[*CONTENDERS, "naive", "bare-hf"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    return ap


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.mode:  # child process
        dump_json(child(args))
        return {}

    kind, name, peak = device_info()
    peak = args.peak_tflops or peak
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    base_cmd = [sys.executable, str(Path(__file__).resolve())] + [a for a in argv if a != "--record"]
    res: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as work:
        tiny_tokenizer(Path(work))  # built once, shared by the children
        for _ in range(args.rounds):
            for c in contenders:  # interleaved: a slow minute on a shared machine hits every contender alike
                res[c].append(run_child(base_cmd, c, work))
    import numpy as np

    med = {c: float(np.median([r["samples_s"] for r in rs])) for c, rs in res.items()}
    rows = []
    for c, rs in res.items():
        mfu = f"{100 * np.median([r['useful_flops_s'] for r in rs]) / (peak * 1e12):.1f}%" if peak else "n/a"
        rows.append([c, median_range([r["samples_s"] for r in rs]), f"{np.median([r['tokens_s'] for r in rs]):.0f}",
                     f"{rs[0]['efficiency']:.3f}", mfu, f"{max(r['peak_gib'] for r in rs):.2f}", str(rs[0]["samples"]),
                     "-" if rs[0]["syncs_per_step"] is None else f"{rs[0]['syncs_per_step']:.2f}"])
    setting = (f"{args.arch}, {'full' if args.full else f'LoRA r={args.lora_r}'}, batch {args.batch_size}, max_length {args.max_length}, "
               f"{args.precision}{', grad ckpt' if args.grad_ckpt else ''}"
               f"{f', kagglekit grad_accum {args.grad_accum}' if args.grad_accum > 1 else ''}, "
               f"{f'{args.steps} timed steps' if args.steps else 'one epoch'}, {args.rounds} interleaved rounds; "
               f"data: {next(iter(res.values()))[0]['source']}")
    cols = ["contender", "samples/s median (min-max)", "real tokens/s", "padding efficiency", "MFU",
            f"peak {'GPU' if kind == 'cuda' else 'RSS'} GiB", "timed samples", "host syncs/step"]
    print_table(f"training: {setting}\n{name}", cols, rows)
    ratios = [f"kagglekit/{c} = {med['kagglekit'] / med[c]:.2f}x" for c in contenders if c != "kagglekit" and "kagglekit" in med]
    line = "samples/s ratios: " + ", ".join(ratios) if ratios else "one contender"
    print(line)
    if args.record:
        record("bench_train", "python benchmarks/bench_train.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"median": med, "results": res}


if __name__ == "__main__":
    main()
