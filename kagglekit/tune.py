"""`kk tune`: Optuna search over the config's `tune:` section.

Each trial is an ordinary `kk train` of one fold (the same function, no second
loop) with the trial's values applied as overrides. The task's metric (validation
log loss, minimised, for LMSYS; validation accuracy, maximised, for WSDM) is
reported to Optuna at every evaluation, so the pruner stops trials that fall
behind. Storage is Optuna's own RDB storage: a SQLite file by default, or any
SQLAlchemy URL (PostgreSQL, MySQL) that several machines share: every
`kk tune` pointed at the same study adds trials to it.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config, config_from_dict, is_folder_name
from .errors import KKError
from .task import LMSYS, Task, get_task


def _optuna():
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    trial_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OneLineFailures) for f in trial_log.filters):
        trial_log.addFilter(_OneLineFailures())
    return optuna


class _OneLineFailures:
    """Optuna logs a trial that raised with the full traceback, then 'Trial N failed with value None.'.
    kk tune reports each such failure in one line itself (a KKError: its message; Ctrl-C or SIGTERM:
    'interrupted'; anything else is raised again by Optuna), so both records are dropped; Optuna's other
    lines (a trial that returned NaN...) stay."""

    def filter(self, record) -> bool:
        return not record.exc_info and not record.getMessage().endswith("failed with value None.")


def make_pruner(name: str):
    pruners = _optuna().pruners
    make = {"median": lambda: pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0), "hyperband": pruners.HyperbandPruner,
            "none": pruners.NopPruner}.get(name)
    if make is None:
        raise KKError(f"--pruner must be median, hyperband or none (got {name!r})")
    return make()


def _storage(url: str):
    optuna = _optuna()
    kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Workers sharing one SQLite file wait for its lock instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    import time
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(5):
        try:
            # The heartbeat lets a later worker mark a trial whose process died as FAIL.
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, **kwargs)
        except Exception as e:  # sqlalchemy raises many types; all mean the same to a user
            # Workers started together on an empty database race to create the schema:
            # the loser sees a unique-key violation and simply tries again.
            if attempt < 4 and ("UniqueViolation" in repr(e) or "already exists" in str(e) or "IntegrityError" in repr(e)):
                time.sleep(0.5 + attempt)
                continue
            raise KKError(f"cannot open storage {url}: {str(e).splitlines()[0]}") from None


def open_study(study_name: str, storage: str, pruner=None, seed: int = 0, create: bool = True, task: Task = LMSYS):
    """Create or continue a study that optimises ``task``'s metric in its direction."""
    optuna = _optuna()
    store = _storage(storage)
    if not create:
        try:
            return optuna.load_study(study_name=study_name, storage=store)
        except KeyError:
            raise KKError(f"no study named {study_name!r} in {storage}") from None
    direction = "maximize" if task.metric.higher_is_better else "minimize"
    try:
        study = optuna.create_study(study_name=study_name, storage=store, direction=direction, load_if_exists=True,
                                    pruner=pruner)
    except ValueError as e:
        raise KKError(f"study {study_name!r} in {storage}: {e}") from None
    if study.direction.name.lower() != direction:
        raise KKError(f"study {study_name!r} in {storage} exists with direction {study.direction.name.lower()}; "
                      f"kk tune {direction[:-1]}es val {task.metric.title} ({task.name}): choose another --study")
    # Seeded, but offset by the trials already stored: a resumed study must not replay the
    # same first suggestions. (Workers that start at the same moment may share early ones.)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def _suggest(trial, key: str, spec, current):
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    if isinstance(current, int) and not isinstance(current, bool):
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def trial_config(base: Config, params: dict, name: str) -> Config:
    from .config import apply_overrides

    raw = apply_overrides(base.model_dump(mode="json"), [f"{k}={v}" for k, v in params.items()])
    raw["name"] = name
    return config_from_dict(raw, f"trial params {params}")


def run_tune(cfg: Config, fold: int = 0, n_trials: int = 10, storage: str | None = None, study_name: str | None = None,
             timeout: float | None = None, runs_root: str | Path = "runs", pruner="median",
             keep_best_only: bool = False):
    """Run ``n_trials`` more trials of the study; returns the Optuna study."""
    study_name = check_study_name(study_name or cfg.name)
    optuna = _optuna()
    if not cfg.tune:
        raise KKError("the config has an empty search space: add a tune: section (e.g. train.lr: {low: 1e-5, high: 3e-4, log: true})")
    storage = storage or f"sqlite:///{Path(runs_root) / 'tune.db'}"
    pruner = make_pruner(pruner) if isinstance(pruner, str) else pruner
    task = get_task(cfg.task)
    study = open_study(study_name, storage, pruner, cfg.seed, task=task)
    study.set_user_attr("base_config", cfg.model_dump(mode="json"))
    study.set_user_attr("fold", fold)
    root = Path(runs_root) / study_name

    from .memory import OutOfMemory, free_memory
    from .train import Interrupted, train_fold
    from .ui import warn

    def run_trial(trial):
        params = {k: _suggest(trial, k, spec, cfg.get(k)) for k, spec in cfg.tune.items()}
        tcfg = trial_config(cfg, params, f"trial_{trial.number}")

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {task.metric.title} {value:.4f} at step {step}")

        try:
            metrics = train_fold(tcfg, fold, root / f"trial_{trial.number}", on_eval=report)
        except Interrupted:
            # Ctrl-C/SIGTERM stops the worker: Optuna marks the trial failed and re-raises a
            # KeyboardInterrupt (never caught by catch=), and the CLI exits 130.
            raise KeyboardInterrupt from None
        except OutOfMemory as e:
            # Parameters that do not fit the GPU (a big lora.r, a long max_length): the trial is marked and
            # fails (catch= below), the study goes on with the next one.
            trial.set_user_attr("out_of_memory", str(e))
            warn(f"trial {trial.number} ran out of GPU memory, marked failed: {e}")
            raise
        finally:
            free_memory("cuda")  # the trial's model goes before the next one loads (a no-op on CPU)
        return metrics[f"val_{task.metric.name}"]

    mine: list[int] = []  # the trials this worker ran

    def objective(trial):
        mine.append(trial.number)
        try:
            return run_trial(trial)
        except KKError as e:
            # A bad value from the search space (lora.r: 0), a bad file...: the trial fails in one line
            # (Optuna's traceback is filtered out) and the study goes on with the next one.
            warn(f"trial {trial.number} failed: {e}")
            raise

    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(KKError,), gc_after_trial=True)
    if keep_best_only:
        import shutil

        best = _best_trial(study)
        for d in root.glob("trial_*"):
            if best is None or d.name != f"trial_{best.number}":
                shutil.rmtree(d, ignore_errors=True)
    print_trials(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    if mine and all(states.get(n) == optuna.trial.TrialState.FAIL for n in mine):
        raise KKError(f"all {len(mine)} trial(s) of this run failed (see the lines above)")
    return study


def _best_trial(study):
    optuna = _optuna()
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    return (max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min)(done, key=lambda t: t.value)


def print_trials(study, top: int | None = None) -> None:
    from .ui import console, table

    sign = -1 if study.direction == _optuna().study.StudyDirection.MAXIMIZE else 1  # best first either way
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: (t.value is None, sign * t.value if t.value is not None else 0, t.number))
    if top:
        trials = trials[:top]
    rows = [[t.number, t.state.name, "" if t.value is None else t.value, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())]
            for t in trials]
    console.print(table(f"study {study.study_name}: {len(study.trials)} trials", ["trial", "state", _metric_name(study), "params"], rows))


def _metric_name(study) -> str:
    """What the study's values are: the task of its base config decides (studies made before tasks: log loss)."""
    task = get_task((study.user_attrs.get("base_config") or {}).get("task", "lmsys"))
    return f"val {task.metric.title}"


def check_study_name(name: str) -> str:
    if not is_folder_name(name):
        raise KKError(f"--study {name!r}: a study is named like a config (one folder under --runs, no '/' or '..')")
    return name


def write_best_config(study_name: str, storage: str, out: str | Path | None = None, force: bool = False) -> Path:
    """The best trial's values applied to the study's base config, as a file `kk train` accepts."""
    from .io import protect_existing, write_text

    check_study_name(study_name)
    study = open_study(study_name, storage, create=False)
    best = _best_trial(study)
    if best is None:
        raise KKError(f"study {study_name!r} has no completed trial yet")
    base = study.user_attrs.get("base_config")
    if base is None:
        raise KKError(f"study {study_name!r} was not made by kk tune (no base config stored)")
    cfg = trial_config(config_from_dict(base), best.params, f"{study_name}-best")
    out = Path(out or Path("configs") / f"{study_name}-best.yaml")
    protect_existing(out, force, "config")
    header = f"# Best of study {study_name} (trial {best.number}, {_metric_name(study)} {best.value:.5f})\n"
    write_text(out, header + cfg.to_yaml())
    print_trials(study, top=5)
    return out
