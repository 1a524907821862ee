"""The `kk` command line: thin wrappers that parse arguments and call one function.

Nothing heavy is imported here: torch, transformers and pandas load inside the
command that needs them, so `kk --help` answers at once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from .errors import KKError

app = typer.Typer(
    name="kk",
    help="kagglekit: K-fold LoRA models for Kaggle's LLM Classification Finetuning (LMSYS arena) competition "
    "and the WSDM Cup 2025 Multilingual Chatbot Arena (task: lmsys | wsdm).\n\n"
    "Typical run: kk make-folds -> kk train --fold all -> kk ensemble -> kk kernel.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (repeatable; values are YAML scalars)."
TASK_HELP = "The competition: lmsys (LLM Classification Finetuning: A/B/tie, log loss, CSV) or wsdm (WSDM Cup multilingual arena: A/B, accuracy, parquet)."


def _task(name: str):
    from .task import get_task

    return get_task(name)
PREDICT_SET_HELP = ("Inference setting for this prediction only, e.g. --set predict.max_length=8192 --set predict.quantization=8bit "
                    "(predict.* keys only; the folds' config.yaml stays as trained; repeatable).")
CONFIG_HELP = "YAML config file (see configs/)."
DEFAULT_CONFIG = "configs/deberta-v3-base.yaml"
SEED_MAX = 2**32 - 1  # numpy's seeds; the config's seed key has the same range


data_app = typer.Typer(
    name="data",
    help="Extra training data: the public preference sets in the competition's format, deduplicated.\n\n"
    "Example: kk data import arena data/arena_conversations.parquet --out data/train_extra.csv",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")


def command(name: str | None = None, group: typer.Typer | None = None, **kwargs):
    """Register a command (on ``group``, default the top level) whose KKError becomes one line on stderr and exit code 1."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except (KKError, KeyboardInterrupt, OSError) as e:  # OSError: disk full, unwritable folder, a path that is a folder...
                from .ui import err_console

                if isinstance(e, KeyboardInterrupt):
                    err_console.print("[bold red]interrupted[/]")
                    raise typer.Exit(130) from None
                kk = isinstance(e, KKError)
                err_console.print(f"[bold red]error:[/] {e if kk else describe_os_error(e)}", highlight=False, soft_wrap=True)
                raise typer.Exit(e.exit_code if kk else 1) from None

        return (group or app).command(name, **kwargs)(wrapper)

    return deco


def describe_os_error(e: OSError) -> str:
    """One line naming the path and the reason: 'submissions/x.csv: No space left on device'."""
    import os

    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e).splitlines()[0] if str(e) else type(e).__name__)
    paths = [p for p in (e.filename, e.filename2) if p]
    return f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason


@command("make-folds")
def make_folds_cmd(
    train: Path | None = typer.Option(None, "--train", help="Competition train file (default: data/train.csv, or data/train.parquet for wsdm)."),
    k: int = typer.Option(5, "--k", help="Number of folds."),
    seed: int = typer.Option(42, "--seed", min=0, max=SEED_MAX, help="Shuffling seed: same input, k and seed give a byte-identical file."),
    out: Path = typer.Option(Path("folds/folds.csv"), "--out", help="Where to write id,fold."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing folds file."),
    bad_rows: str = typer.Option("error", "--bad-rows", help="error | skip | repair (salvage cut-off JSON cells)."),
    task: str = typer.Option("lmsys", "--task", help=TASK_HELP),
    stratify_language: bool = typer.Option(False, "--stratify-language", help="Keep each language's share even across folds too (wsdm: the language column)."),
):
    """Stratified, prompt-grouped K folds -> id,fold CSV.

    Example: kk make-folds --train data/train.csv --k 5 --seed 42 --out folds/folds.csv
    WSDM:    kk make-folds --task wsdm --train data/train.parquet --k 5 --stratify-language
    """
    from .data import load_train
    from .folds import fold_summary, make_folds, write_folds
    from .ui import console, frame_table, info

    t = _task(task)
    if stratify_language and not t.language_column:
        raise KKError(f"--stratify-language: task {t.name} has no language column")
    train = train or Path("data") / t.train_file
    df, report = load_train(train, _bad_rows(bad_rows), t)
    report.print_warnings()
    folds = make_folds(df, k=k, seed=seed, stratify_language=t.language_column if stratify_language else None)
    path = write_folds(folds, out, force=force, train=train)
    console.print(frame_table(f"{k} folds of {train} (class shares)", fold_summary(df, folds, t), "{:.3f}"))
    info(f"wrote {path}")


def _bad_rows(value: str) -> str:
    if value not in ("error", "skip", "repair"):
        raise KKError(f"--bad-rows must be error, skip or repair (got {value!r})")
    return value


@command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="File to write: parquet when it ends in .parquet, CSV otherwise."),
    n: int = typer.Option(500, "--n", help="Number of rows."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed: the same seed gives the same file."),
    test: bool = typer.Option(False, "--test", help="Write a test file (no labels, no model names)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    task: str = typer.Option("lmsys", "--task", help=TASK_HELP),
):
    """Arena-shaped synthetic data with a learnable signal (for demos and tests), in the task's shape.

    Example: kk synth --n 500 --out data/train.csv
    WSDM:    kk synth --task wsdm --n 500 --out data/train.parquet
    """
    from .io import protect_existing, write_table
    from .synthetic import make_synthetic
    from .ui import info

    if n < 1:
        raise KKError(f"--n must be at least 1 (got {n})")
    t = _task(task)
    protect_existing(out, force, "file")
    write_table(out, make_synthetic(n, seed=seed, with_labels=not test, task=t))
    info(f"wrote {n} {t.name} rows to {out}")


@command("config")
def config_cmd(
    config: Path | None = typer.Argument(None, help="A config file to validate and print (default: the defaults)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    show: bool = typer.Option(False, "--show", help="Print every key with its default and description."),
):
    """Validate a config and print it resolved, or document every key.

    Example: kk config configs/deberta-v3-base.yaml --set train.lr=1e-4
    """
    from .config import describe_fields, load_config
    from .ui import console, table

    cfg = load_config(config, set_)
    if show:
        console.print(table("config keys", ["key", "default", "description"], describe_fields()))
    else:
        console.print(cfg.to_yaml(), highlight=False, markup=False)


def _load(config: Path | None, set_: list[str], train: Path | None = None, folds: Path | None = None,
          test: Path | None = None):
    """Config + --set overrides + the data-path options every command shares."""
    from .config import load_config

    extra = [f"data.{key}={path}" for key, path in (("train", train), ("folds", folds), ("test", test)) if path is not None]
    return load_config(config, list(set_) + extra)


@command("train")
def train_cmd(
    fold: str = typer.Option(..., "--fold", help="Fold number to validate on, or 'all'."),
    config: Path = typer.Option(Path(DEFAULT_CONFIG), "--config", "-c", help=CONFIG_HELP),
    train: Path | None = typer.Option(None, "--train", help="Override data.train."),
    folds: Path | None = typer.Option(None, "--folds", help="Override data.folds."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (default runs/<config name>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fold from its checkpoint."),
    force: bool = typer.Option(False, "--force", help="Retrain a fold that is already trained."),
    plan: bool = typer.Option(False, "--plan", help="Print the per-GPU memory plan (no weights read) and stop: exit 0 if it fits, 1 naming the knobs."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="--plan: GPUs (processes) to plan for."),
    gpu_gib: float = typer.Option(80.0, "--gpu-gib", min=0.1, help="--plan: memory of one GPU in GiB."),
):
    """Train one LoRA model per fold with A/B swap augmentation; writes adapter, metrics and OOF predictions.

    Example: kk train --fold 0 --config configs/deberta-v3-base.yaml --set train.lr=1e-4
    Plan:    kk train --fold 0 --config configs/gemma2-9b-fsdp-full.yaml --plan --gpus 4 --gpu-gib 80
    """
    cfg = _load(config, set_, train, folds)
    if plan:
        from .memory import GIB, PARTS, plan_verdict, zero_stage_of
        from .ui import console, table

        strategy = "ddp" if cfg.train.strategy == "auto" else cfg.train.strategy
        p, need, knobs = plan_verdict(cfg, gpus, strategy, gpu_gib, zero_stage_of(cfg, strategy))
        console.print(table(f"{cfg.model.backbone}: {p['parameters'] / 1e9:.2f}B parameters, {p['trained'] / 1e6:.1f}M trained, "
                            f"{p['tokens']} tokens a micro-batch, {strategy} on {gpus} GPU(s)", ["per GPU", "GiB"],
                            [*([k, f"{p[k] / GIB:.2f}"] for k in PARTS), ["total", f"{need:.2f}"], ["GPU", f"{gpu_gib:.2f}"]]))
        if knobs:
            raise KKError(f"does not fit: {need:.1f} GiB per GPU > 90% of {gpu_gib:.1f} GiB; fits with: {'; '.join(knobs)}")
        return console.print("fits")
    from .train import train_folds

    train_folds(cfg, fold, run, resume=resume, force=force)


@command("tiny-model")
def tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the model and tokenizer to."),
    arch: str = typer.Option("deberta-v2", "--arch", help="deberta-v2 (relative attention, as DeBERTa-v3), or a decoder: llama, qwen2, mistral, gemma2."),
    train: Path | None = typer.Option(None, "--train", help="Train the tokenizer on this file's texts, CSV or parquet (default: synthetic)."),
    vocab_size: int = typer.Option(1000, "--vocab-size", help="Tokenizer vocabulary size."),
    hidden: int = typer.Option(64, "--hidden", help="Hidden size."),
    layers: int = typer.Option(2, "--layers", help="Number of layers."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier tiny model in OUT_DIR (never a folder kk tiny-model did not make)."),
    task: str = typer.Option("lmsys", "--task", help="The classifier head's classes: " + TASK_HELP),
):
    """Build a tiny random model + tokenizer offline (for tests, demos and CPU smoke runs).

    Example: kk tiny-model models/tiny-deberta --train data/train.csv
    WSDM:    kk tiny-model models/tiny-deberta-wsdm --task wsdm --train data/train.parquet
    """
    from .tiny import build_tiny_model
    from .ui import info

    path = build_tiny_model(out_dir, arch, str(train) if train else None, vocab_size, hidden, layers, task=_task(task),
                            force=force)
    info(f"wrote a tiny {arch} model to {path} (load it with model.backbone={path})")


@command("predict")
def predict_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder with trained folds."),
    fold: int = typer.Option(..., "--fold", help="Fold to predict with."),
    test: Path = typer.Option(Path("data/test.csv"), "--test", help="Competition test file (test.csv; test.parquet for wsdm)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Swap test-time augmentation (average (A,B) and mapped-back (B,A))."),
    tta_uncertain: bool = typer.Option(False, "--tta-uncertain", help="The swapped order only on the fold's predict.tta_share least confident rows (predict.tta: uncertain)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override predict.batch_size."),
    backbone: str | None = typer.Option(None, "--backbone", help="Load the backbone from here instead of the path in config.yaml."),
    force: bool = typer.Option(False, "--force", help="Predict again even if fold_K/test.csv is up to date."),
    set_: list[str] = typer.Option([], "--set", help=PREDICT_SET_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: the fold's predict.threads, 0 = torch's own)."),
):
    """One fold's test probabilities -> runs/<experiment>/fold_K/test.csv (test.<key>.csv at other --set settings).

    Example: kk predict --run runs/deberta-v3-base --fold 0 --test data/test.csv --threads 4
    At 8-bit and 8192 tokens: kk predict --run runs/gemma2-9b-qlora --fold 0 --set predict.quantization=8bit --set predict.max_length=8192
    """
    from .predict import predict_fold
    from .ui import console, table

    df = predict_fold(run, fold, test, tta="uncertain" if tta and tta_uncertain else tta, batch_size=batch_size, force=force,
                      backbone=backbone, overrides=set_, threads=threads)
    columns = [c for c in df.columns if c != "id"]  # the task's probability columns
    means = df[columns].mean()
    console.print(table(f"fold {fold}: {len(df)} test rows -> {run}/fold_{fold}/test.csv", ["column", "mean"],
                        [[c, float(means[c])] for c in columns]))


@command("ensemble")
def ensemble_cmd(
    run: list[Path] = typer.Option(..., "--run", help="Run folder (repeat to blend several runs, e.g. a DeBERTa and an LLM)."),
    test: Path = typer.Option(Path("data/test.csv"), "--test", help="Competition test file (test.csv; test.parquet for wsdm)."),
    out: Path = typer.Option(Path("submissions/submission.csv"), "--out", help="Submission file to write."),
    folds: str = typer.Option("all", "--folds", help="Folds to use: all, or e.g. 0,2,4."),
    method: str = typer.Option("mean", "--method", help="mean (arithmetic) or geo (geometric, log-space)."),
    fit: bool = typer.Option(True, "--fit/--no-fit", help="Fit run weights and a temperature on OOF (kept only if OOF improves)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Swap test-time augmentation."),
    tta_uncertain: bool = typer.Option(False, "--tta-uncertain", help="The swapped order only on the predict.tta_share rows the run's folds are least confident of together (predict.tta: uncertain)."),
    train: Path | None = typer.Option(None, "--train", help="Train file for OOF labels (default: the run's data.train)."),
    sample_submission: Path | None = typer.Option(None, "--sample-submission", help="Check columns and ids against Kaggle's sample_submission.csv."),
    backbone: str | None = typer.Option(None, "--backbone", help="Load the backbone from here instead of the path in config.yaml."),
    bad_rows: str | None = typer.Option(None, "--bad-rows", help="Bad rows of the train file (OOF labels): error, skip or repair (default: the run's data.bad_rows)."),
    oof_out: Path | None = typer.Option(None, "--oof-out", help="Also write the calibrated OOF ensemble (id + probabilities). "
                                        "As a student's data.soft_labels it LEAKS into the student's CV (the model that "
                                        "labelled fold j's rows trained on fold K's): use kk distill-labels for students."),
    force: bool = typer.Option(False, "--force", help="Overwrite the submission (default: keep the old one, renamed with a timestamp) and re-predict."),
    set_: list[str] = typer.Option([], "--set", help=PREDICT_SET_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: each fold's predict.threads, 0 = torch's own)."),
):
    """Average fold probabilities with swap TTA, calibrate on OOF, write submission.csv (the run's task:
    probabilities for lmsys, id,winner labels by argmax for wsdm).

    Example: kk ensemble --run runs/deberta-v3-base --test data/test.csv --out submissions/submission.csv
    WSDM:    kk ensemble --run runs/wsdm --test data/test.parquet --sample-submission data/sample_submission.csv
    At 8-bit: kk ensemble --run runs/gemma2-9b-qlora --test data/test.csv --set predict.quantization=8bit
    """
    from .ensemble import ensemble

    ensemble(run, test, out, folds=folds, method=method, fit=fit, tta="uncertain" if tta and tta_uncertain else tta, force=force,
             sample_submission=sample_submission, train_path=train, backbone=backbone,
             bad_rows=_bad_rows(bad_rows) if bad_rows else None, oof_out=oof_out, overrides=set_, threads=threads)


@command("distill-labels")
def distill_labels_cmd(
    teacher: list[Path] = typer.Option(..., "--teacher", help="A teacher run folder, trained on the same folds (repeat for several teachers)."),
    weight: list[float] = typer.Option([], "--weight", help="One weight per --teacher (default equal): the teachers are averaged in logit space."),
    train: Path = typer.Option(Path("data/train.csv"), "--train", help="The competition train.csv the teachers and the student train on."),
    folds: Path = typer.Option(Path("folds/folds.csv"), "--folds", help="The folds file the teachers were trained with (and the student will be)."),
    out: Path = typer.Option(..., "--out", help="Folder for fold_K.csv (one per fold) and teacher_labels.json."),
    extra: list[Path] = typer.Option([], "--extra", help="Also label these rows (test or train format) in every fold's file: pseudo-labelled data.extra."),
    fold: str = typer.Option("all", "--fold", help="Folds to label: all, or e.g. 0,2 (as the teachers' folds finish)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Swap test-time augmentation."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override each teacher's predict.batch_size."),
    backbone: str | None = typer.Option(None, "--backbone", help="Load the teachers' backbone from here instead of the path in their config.yaml."),
    bad_rows: str = typer.Option("error", "--bad-rows", help="Bad rows of the train file: error, skip or repair."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing fold_K.csv files."),
    task: str = typer.Option("lmsys", "--task", help=TASK_HELP),
):
    """Leak-free soft labels for a student: fold K's training rows predicted by the teachers' fold-K models only.

    The teachers' fold-K models never saw fold K's validation rows, so a student trained on fold K's file keeps an
    honest fold-K score (an OOF file from kk ensemble --oof-out does not). They are the teachers' predictions on
    their own training rows, usually more confident than OOF ones: soften them with train.distill.temperature > 1.

    Example: kk distill-labels --teacher runs/teacher --train data/train.csv --folds folds/folds.csv --out data/teacher_labels
    Then:    kk train --fold all --config configs/student.yaml     (data.soft_labels: data/teacher_labels/fold_{fold}.csv)
    """
    from .distill import teacher_labels
    from .runs import parse_fold_list
    from .ui import console, info, table

    rows = teacher_labels(teacher, train, folds, out, weight, extra, tta=tta, batch_size=batch_size, backbone=backbone,
                          bad_rows=_bad_rows(bad_rows), force=force, task_name=_task(task).name,
                          only_folds=None if fold == "all" else parse_fold_list(fold))
    console.print(table(f"teacher labels in {out} ({len(teacher)} teacher(s))",
                        ["fold", "rows", "extra", "loss: own train rows", "loss: OOF", "max p: train", "max p: OOF"],
                        [[r["fold"], r["rows"], r["extra"], r["in_sample_log_loss"], r["oof_log_loss"], r["in_sample_confidence"],
                          r["oof_confidence"]] for r in rows]))
    info("log loss and mean top probability of the teachers on their own training rows (the labels) and on their OOF "
         "rows: in-sample predictions are usually sharper than OOF ones (a model that fits its training rows), and "
         "train.distill.temperature > 1 softens them. "
         f"Student: --set data.soft_labels={out}/fold_{{fold}}.csv")


@command("import", group=data_app)
def data_import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="arena (chatbot_arena_conversations), ultrafeedback, hh-rlhf or pairs (generic chosen/rejected JSONL)."),
    src: Path = typer.Argument(..., help="The source file: JSON, JSON lines (.gz too) or parquet."),
    out: Path = typer.Option(..., "--out", help="The train-format file to write (for data.extra): parquet when it ends in .parquet, CSV otherwise."),
    train: Path | None = typer.Option(Path("data/train.csv"), "--train", help="Drop rows that repeat a row of this train.csv (prompt + both responses, normalised)."),
    test: Path | None = typer.Option(Path("data/test.csv"), "--test", help="Drop rows that repeat a row of this test.csv."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Do not read --train/--test (only rows repeated in the source are dropped)."),
    seed: int = typer.Option(42, "--seed", min=0, max=SEED_MAX, help="Draws which side (A or B) the chosen response lands on."),
    limit: int | None = typer.Option(None, "--limit", help="Read only the first N records."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
    task: str = typer.Option("lmsys", "--task", help=TASK_HELP),
):
    """A public preference set in the competition's train format, deduplicated against train and test; a table of what was dropped and why.

    Example: kk data import arena data/arena_conversations.parquet --out data/train_extra.csv --train data/train.csv --test data/test.csv
    Then:    kk train --fold all --config configs/deberta-v3-base.yaml --set "data.extra=[{path: data/train_extra.csv}]"
    """
    from .importers import import_data
    from .ui import console, info, table

    report = import_data(fmt, src, out, None if no_dedup else train, None if no_dedup else test, seed=seed, limit=limit, force=force,
                         task_name=_task(task).name)
    console.print(table(f"{src} ({fmt}): {report.records} record(s)", ["rows", "count"], report.rows()))
    if report.first_malformed:
        info(f"first malformed record: {report.first_malformed}")
    if report.shared_prompts:
        info(f"{report.shared_prompts} kept row(s) share a prompt with a train row: at training time each stays out of the "
             "fold that validates on that prompt")
    info(f"wrote {report.kept} rows to {out} (train it with: --set \"data.extra=[{{path: {out}}}]\")")


@command("predict-one")
def predict_one_cmd(
    prompt: str = typer.Argument(..., help="The prompt (a JSON list of turns also works)."),
    response_a: str = typer.Argument(..., help="Response A."),
    response_b: str = typer.Argument(..., help="Response B."),
    run: Path = typer.Option(..., "--run", help="Run folder with trained folds."),
    folds: str = typer.Option("all", "--folds", help="Folds to average: all, or e.g. 0,2."),
):
    """Probabilities for one (prompt, A, B), averaged over folds with swap TTA.

    Example: kk predict-one --run runs/tiny "What is 2+2?" "4" "5"
    """
    import json

    from .predict import Predictor
    from .ui import console, table

    def turns(s: str):
        try:
            v = json.loads(s)
            return v if isinstance(v, list) else s
        except ValueError:
            return s

    res = Predictor.from_run(run, folds).predict_one(turns(prompt), turns(response_a), turns(response_b))
    console.print(table("prediction", ["column", "probability"], [[k, v] for k, v in res.items()]))


@command("merge")
def merge_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder whose fold adapters to merge."),
    out: Path | None = typer.Option(None, "--out", help="The merged run's folder (default: <run>-merged)."),
    method: str = typer.Option("factors", "--method", help="factors (average lora_A and lora_B) or delta (exact: average each fold's B A, merged into the base weights)."),
    folds: str = typer.Option("all", "--folds", help="Folds to merge: all, or e.g. 0,2,4."),
    unload: bool = typer.Option(False, "--unload", help="With factors: fold the averaged adapter into a plain model (faster inference)."),
    test: Path | None = typer.Option(None, "--test", help="Compare the merged model with the fold ensemble on these rows: distance and speed-up."),
    check_rows: int = typer.Option(200, "--check-rows", min=0, help="Compare the merged model with the fold ensemble on this many OOF rows (0 skips); a large distance is warned about."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier kk merge output (never the run itself or a folder kk merge did not make)."),
):
    """Merge a run's fold LoRA adapters into one model: a run of its own for kk predict / ensemble / kernel.

    Example: kk merge --run runs/deberta-v3-base --method delta --test data/test.csv
    """
    import json

    from .merge import compare_with_folds, merge_run
    from .runs import open_run
    from .ui import console, info, table

    path = merge_run(run, out or run.with_name(f"{run.name}-merged"), folds, method, unload, force, check_rows)
    metrics = json.loads((path / "fold_0" / "metrics.json").read_text())
    c = metrics.get("fold_ensemble_check")
    if c:
        console.print(table(f"merged ({method}) vs the fold ensemble on {c['rows']} OOF rows", ["measure", "value"],
                            [["mean |p_merged - p_folds|", c["mean_abs_diff"]], ["max |p_merged - p_folds|", c["max_abs_diff"]],
                             ["a single fold's mean |p_fold - p_folds|", c["fold_mean_abs_diff"]],
                             ["same argmax", c["argmax_agreement"]],
                             ["verdict", "far: it does not stand for the ensemble" if c["far"] else "close"]], floats="{:.5f}"))
    cal = metrics.get("calibration")
    info(f"wrote {path} (a one-fold run: kk ensemble --run {path}); calibration carried over for kk ensemble: "
         + (f"temperature {cal['temperature']:.3f} (the source folds' cross-fitted choice)" if cal and cal["kept"] else "none"))
    if test is not None:
        c = compare_with_folds(open_run(run, folds), path, test)
        console.print(table(f"merged ({method}) vs the fold ensemble on {c['rows']} rows of {test}", ["measure", "value"],
                            [["mean |p_merged - p_folds|", c["mean_abs_diff"]], ["max |p_merged - p_folds|", c["max_abs_diff"]],
                             ["KL(folds || merged)", c["kl_ensemble_to_merged"]], ["same argmax", c["argmax_agreement"]],
                             ["fold ensemble (s)", c["folds_s"]], ["merged (s)", c["merged_s"]],
                             ["speed-up", f"{c['speedup']:.2f}x"]], floats="{:.5f}"))


@command("quantize")
def quantize_cmd(
    run: Path = typer.Option(..., "--run", help="A full-weight run (kk merge --unload / --method delta output, fp16 or fp32)."),
    bits: int = typer.Option(8, "--bits", help="8 or 4 (GPTQ, symmetric)."),
    out: Path = typer.Option(..., "--out", help="The quantized run's folder."),
    rows: int = typer.Option(128, "--rows", min=1, help="Calibration rows (the run's training rows, its formatter)."),
    length: int = typer.Option(2100, "--length", min=16, help="Calibration tokens per row at most."),
    group: int = typer.Option(128, "--group-size", min=1, help="Columns sharing one scale."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier kk quantize output."),
):
    """GPTQ-quantize a merged run for kk predict / ensemble / kernel (defaults: the LMSYS 1st place's 128 rows x 2,100
    tokens, group size 128). Example: kk quantize --run runs/gemma2-merged --bits 8 --out runs/gemma2-gptq8"""
    from .quantize import quantize_run
    from .ui import info

    info(f"wrote {quantize_run(run, out, bits, rows, length, group, force)}")


@command("report")
def report_cmd(
    run: list[Path] = typer.Option(..., "--run", help="Run folder (repeat to compare runs)."),
    out: Path = typer.Option(Path("reports/report.html"), "--out", help="The HTML file to write (self-contained, viewable offline)."),
    train: Path | None = typer.Option(None, "--train", help="Train file for the OOF labels (default: the run's data.train)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
):
    """One HTML page: task, per-fold table, accuracy per language (wsdm), learning curves, reliability diagram,
    confusion matrix, truncation, ensemble weights.

    Example: kk report --run runs/deberta-v3-base --out reports/deberta.html
    """
    from .report import build_report
    from .ui import info

    info(f"wrote {build_report(run, out, train, force)}")


@command("demo")
def demo_cmd(
    out: Path | None = typer.Option(None, "--out", help="Folder for everything the demo makes (default: a new temporary folder)."),
    n: int = typer.Option(600, "--n", help="Synthetic training rows."),
    k: int = typer.Option(3, "--k", help="Folds."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override train.epochs of the tiny preset."),
    task: str = typer.Option("lmsys", "--task", help=TASK_HELP),
):
    """The whole pipeline offline on CPU: synthetic data, tiny model, folds, training, ensemble, submission.

    Example: kk demo --out /tmp/kk-demo
    WSDM:    kk demo --task wsdm --out /tmp/kk-demo-wsdm
    """
    from .demo import run_demo

    run_demo(out, n=n, k=k, epochs=epochs, task=_task(task))


@command("tune")
def tune_cmd(
    config: Path = typer.Option(Path(DEFAULT_CONFIG), "--config", "-c", help=CONFIG_HELP + " Its tune: section is the search space."),
    fold: int = typer.Option(0, "--fold", help="Fold each trial validates on."),
    n_trials: int = typer.Option(10, "--n-trials", help="Trials to add to the study (re-running continues it)."),
    storage: str | None = typer.Option(None, "--storage", help="SQLAlchemy URL (default sqlite:///runs/tune.db); share a PostgreSQL URL between machines."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: the config name)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop starting trials after this many seconds."),
    pruner: str = typer.Option("median", "--pruner", help="median, hyperband or none."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Trials are kept in RUNS/<study>/trial_<n>."),
    keep_best_only: bool = typer.Option(False, "--keep-best-only", help="Delete every trial folder but the best one."),
    best: bool = typer.Option(False, "--best", help="Only show the best trials and write configs/<study>-best.yaml."),
    best_out: Path | None = typer.Option(None, "--best-out", help="Where --best writes the config."),
    force: bool = typer.Option(False, "--force", help="With --best: overwrite an existing best config."),
    train: Path | None = typer.Option(None, "--train", help="Override data.train."),
    folds: Path | None = typer.Option(None, "--folds", help="Override data.folds."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Optuna hyperparameter search: resumable, pruned, shared by many workers through one storage.

    Example: kk tune --config configs/deberta-v3-base.yaml --fold 0 --n-trials 30 --study deberta-lr
    Then:    kk tune --study deberta-lr --best
    """
    from .tune import run_tune, write_best_config
    from .ui import info

    if best:
        name = study or _load(config, set_).name
        out = write_best_config(name, storage or f"sqlite:///{runs / 'tune.db'}", best_out, force=force)
        info(f"wrote {out} (train it with: kk train --fold all --config {out})")
        return
    cfg = _load(config, set_, train, folds)
    run_tune(cfg, fold, n_trials, storage, study, timeout, runs, pruner, keep_best_only)


@command("kernel")
def kernel_cmd(
    run: list[Path] = typer.Option([], "--run", help="Run folder(s) to package."),
    name: str | None = typer.Option(None, "--name", help="Kernel name/slug (default: the first run's folder name)."),
    out: Path | None = typer.Option(None, "--out", help="Where to write (default kernels/<name>)."),
    user: str | None = typer.Option(None, "--user", help="Kaggle user name (default: KAGGLE_USERNAME or kaggle.json)."),
    backbone_source: str | None = typer.Option(None, "--backbone-source", help="Kaggle dataset/model <owner>/<slug> that holds a hub backbone."),
    folds: str = typer.Option("all", "--folds", help="Folds to package: all, or e.g. 0,2,4."),
    wheel: list[Path] = typer.Option([], "--wheel", help="Extra wheel to bundle (for packages Kaggle's image lacks)."),
    train: Path | None = typer.Option(None, "--train", help="Train file for the OOF labels that fit weights/temperature (default: the run's data.train)."),
    machine_shape: str = typer.Option("NvidiaTeslaT4", "--machine-shape", help="GPU written to kernel-metadata.json: NvidiaTeslaT4 (2 x T4), NvidiaL4, NvidiaTeslaT4Highmem (a P100 is refused: Kaggle's torch has no kernels for it)."),
    time_budget_h: float | None = typer.Option(None, "--time-budget-h", help="The notebook's time budget in hours (default: the runs' predict.time_budget_h): the swapped-order TTA pass runs only as far as it allows. With --dry-run: this run's budget (a small one shows the one-order fallback)."),
    plan: bool = typer.Option(False, "--plan", help="With --run: print the plan (per run: one fold per GPU, split over both, or refused; rows x folds x passes -> hours against the budget) and stop."),
    rows: Path | None = typer.Option(None, "--rows", help="With --run: a CSV whose rows' token counts the estimate uses (default: the run's data.test, else data.train)."),
    pin_deps: bool = typer.Option(False, "--pin-deps", help="Bundle the transformers/peft/tokenizers/accelerate wheels the run was trained with."),
    force: bool = typer.Option(False, "--force", help="Rebuild an existing kernel folder."),
    dry_run: Path | None = typer.Option(None, "--dry-run", help="Run this built kernel locally, offline, as Kaggle would."),
    test: Path | None = typer.Option(None, "--test", help="With --dry-run: the test file to use, CSV or parquet (default: synthetic)."),
    python: str | None = typer.Option(None, "--python", help="With --dry-run: run the notebook under this Python (e.g. a venv with Kaggle's package versions)."),
    gpu_factor: float = typer.Option(1.0, "--gpu-factor", help="With --dry-run: how many times faster Kaggle's GPU is than this machine, for the 25k-row estimate."),
    push: Path | None = typer.Option(None, "--push", help="Push this built kernel and its datasets with the kaggle CLI."),
    set_: list[str] = typer.Option([], "--set", help=PREDICT_SET_HELP + " Written into the kernel's copy of each fold's config."),
):
    """Package inference as an offline Kaggle notebook; dry-run it locally with the network off; push it.

    Example: kk kernel --run runs/gemma2-9b-qlora --name gemma2-5fold --set predict.quantization=8bit --plan   (placement and hours)
    Then:    kk kernel --run runs/gemma2-9b-qlora --name gemma2-5fold --set predict.quantization=8bit --backbone-source google/gemma-2/transformers/gemma-2-9b/1
    Then:    kk kernel --dry-run kernels/gemma2-5fold --test data/test.csv
    Fast baseline: kk kernel --run runs/deberta-v3-base --name deberta-v3-5fold
    """
    from . import kernel as K

    if dry_run is not None:
        K.dry_run(dry_run, test, gpu_factor=gpu_factor, python=python, time_budget_h=time_budget_h)
    elif push is not None:
        K.push(push)
    else:
        if not run:
            raise KKError("give --run to build a kernel (or --dry-run/--push DIR)")
        K.build_kernel(run, name, out, user, backbone_source, folds, wheel, force, train_path=train,
                       machine_shape=machine_shape, pin_deps=pin_deps, time_budget_h=time_budget_h, plan_only=plan,
                       rows_for_estimate=rows, overrides=set_)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
