"""`kk demo`: the whole chain, offline, on CPU, in a few minutes.

Synthesize arena-shaped data, build a tiny DeBERTa-v2, make folds, train every
fold, ensemble with swap TTA, write a checked submission, then package the
offline Kaggle kernel and dry-run it: what a competitor runs on Kaggle's data,
at toy scale. ``task`` chooses the competition: LMSYS (CSV, three classes, probabilities) or
WSDM (parquet, two classes, folds stratified by language too, ``id,winner`` labels).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import KKError
from .task import LMSYS, Task


def run_demo(out_dir=None, n: int = 600, k: int = 3, epochs: int | None = None, seed: int = 42, task: Task = LMSYS) -> dict:
    from .config import load_config
    from .data import load_train
    from .ensemble import ensemble
    from .folds import make_folds, write_folds
    from .io import write_table
    from .synthetic import make_synthetic
    from .tiny import build_tiny_model
    from .train import train_folds
    from .ui import console

    if n < 10 * k:
        raise KKError(f"--n {n} is too small for {k} folds")
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="kk-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"

    def step(i: int, text: str) -> None:
        console.rule(f"[bold]{i}/6 {text}")

    train_file, test_file = data / task.train_file, data / task.test_file
    step(1, f"synthetic {task.name} data: {n} train rows, {max(20, n // 6)} test rows -> {data}")
    write_table(train_file, make_synthetic(n, seed=seed, task=task))
    write_table(test_file, make_synthetic(max(20, n // 6), seed=seed + 1, with_labels=False, task=task))
    step(2, "tiny DeBERTa-v2 backbone, tokenizer trained on the data")
    backbone = build_tiny_model(out / "models" / "tiny-deberta", "deberta-v2", str(train_file), task=task, force=True)
    step(3, f"{k} stratified, prompt-grouped folds" + (f" (and by {task.language_column})" if task.language_column else ""))
    df, _ = load_train(train_file, task=task)
    write_folds(make_folds(df, k, seed, stratify_language=task.language_column), out / "folds" / "folds.csv", force=True)
    overrides = [f"data.train={train_file}", f"data.test={test_file}",
                 f"data.folds={out / 'folds' / 'folds.csv'}", f"model.backbone={backbone}", f"task={task.name}"]

    if epochs:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config(Path(__file__).resolve().parent / "presets" / "tiny.yaml", overrides)
    step(4, "train every fold (LoRA, swap augmentation, TTA evaluation)")
    train_folds(cfg, "all", out / "runs" / cfg.name, force=True)
    step(5, "ensemble with swap TTA -> submission")
    report = ensemble([out / "runs" / cfg.name], test_file, out / "submissions" / "submission.csv", force=True)
    step(6, "offline Kaggle kernel: build it, then dry-run it with the network off")
    from .kernel import build_kernel, dry_run

    kdir = build_kernel([out / "runs" / cfg.name], "kagglekit-demo", out / "kernels" / "kagglekit-demo", user="kagglekit-demo", force=True)
    report["dry_run"] = dry_run(kdir, test_file, keep=str(out / "kernels" / "dry-run"))
    console.print(f"[bold green]demo finished[/]: {report['submission']}")
    report["out_dir"] = out
    return report
