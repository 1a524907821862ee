"""The `kk` command line: thin wrappers that parse arguments and call one function.

Nothing heavy is imported here: torch, transformers and pandas load inside the
command that needs them, so `kk --help` answers at once.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import KKError

app = typer.Typer(
    name="kk",
    help="kagglekit: K-fold LoRA models for Kaggle's LLM Classification Finetuning (LMSYS arena) competition.\n\n"
    "Typical run: kk make-folds -> kk train --fold all -> kk ensemble -> kk kernel.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (repeatable; values are YAML scalars)."
CONFIG_HELP = "YAML config file (see configs/)."
DEFAULT_CONFIG = "configs/deberta-v3-base.yaml"


def command(name: str | None = None, **kwargs):
    """Register a command whose KKError becomes one line on stderr and exit code 1."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except KKError as e:
                from .ui import err_console

                err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                from .ui import err_console

                err_console.print("[bold red]interrupted[/]")
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(wrapper)

    return deco


def _print_load_warnings(report) -> None:
    from .ui import warn

    for w in report.warnings():
        warn(w)


@command("make-folds")
def make_folds_cmd(
    train: Path = typer.Option(Path("data/train.csv"), "--train", help="Competition train.csv."),
    k: int = typer.Option(5, "--k", help="Number of folds."),
    seed: int = typer.Option(42, "--seed", help="Shuffling seed: same input, k and seed give a byte-identical file."),
    out: Path = typer.Option(Path("folds/folds.csv"), "--out", help="Where to write id,fold."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing folds file."),
    bad_rows: str = typer.Option("error", "--bad-rows", help="error | skip | repair (salvage cut-off JSON cells)."),
):
    """Stratified, prompt-grouped K folds -> id,fold CSV.

    Example: kk make-folds --train data/train.csv --k 5 --seed 42 --out folds/folds.csv
    """
    from .data import load_train
    from .folds import fold_summary, make_folds, write_folds
    from .ui import console, frame_table, info

    df, report = load_train(train, _bad_rows(bad_rows))
    _print_load_warnings(report)
    folds = make_folds(df, k=k, seed=seed)
    path = write_folds(folds, out, force=force)
    console.print(frame_table(f"{k} folds of {train} (class shares)", fold_summary(df, folds), "{:.3f}"))
    info(f"wrote {path}")


def _bad_rows(value: str) -> str:
    if value not in ("error", "skip", "repair"):
        raise KKError(f"--bad-rows must be error, skip or repair (got {value!r})")
    return value


@command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
    n: int = typer.Option(500, "--n", help="Number of rows."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same file."),
    test: bool = typer.Option(False, "--test", help="Write a test.csv (no labels, no model names)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Arena-shaped synthetic data with a learnable signal (for demos and tests).

    Example: kk synth --n 500 --out data/train.csv
    """
    from .io import protect_existing, write_csv
    from .synthetic import make_synthetic
    from .ui import info

    if n < 1:
        raise KKError(f"--n must be at least 1 (got {n})")
    protect_existing(out, force, "file")
    write_csv(out, make_synthetic(n, seed=seed, with_labels=not test))
    info(f"wrote {n} rows to {out}")


@command("config")
def config_cmd(
    config: Optional[Path] = typer.Argument(None, help="A config file to validate and print (default: the defaults)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
