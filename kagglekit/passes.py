"""Passes over the test rows, fold by fold, in order of value, inside a time budget: the one orchestrator of test
prediction. ``kk predict`` / ``kk ensemble`` run it on one device with no budget (and each fold's cache,
:mod:`kagglekit.predict`); the Kaggle kernel (:func:`kagglekit.kernel.offline.run_offline`) on its GPUs with one.

Pass 1 predicts every row in the (A,B) order and writes a checked submission; pass 2, the (B,A) order on every row or
on the least confident ones, runs only as far as the pass-1 speed says it ends inside ``predict.time_budget_h``
(README, "A time budget that always leaves a submission"). ``kk_passes.json`` beside the submission records the
plan, the measured speed and which passes ran.

Folds (of any run) sharing a backbone, quantization and precision form a group that loads its base once per GPU
and switches adapters (an :class:`kagglekit.engine.Engine`; placement: :func:`make_units`). Between groups a GPU's
memory is freed on that GPU only; the last group of a pass stays loaded for the next pass, which visits the groups
in reverse order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .inference import TokenCache, predict_order
from .kernel.common import KAGGLE_LIMIT_H
from .ui import duration

PASSES_JSON = "kk_passes.json"
# Kept free at the end of the budget: combining and writing the submission, the notebook's last cell.
WRITE_RESERVE_S = 120.0
# Pass 1 may not start a fold projected to end past this (Kaggle's limit less a margin): a submission
# with fewer folds scores, one that is cut off does not. The first fold of each run always runs.
HARD_LIMIT_S = KAGGLE_LIMIT_H * 3600 - 15 * 60
# A second pass over less than this share of the rows is not worth reloading models for.
MIN_SECOND_SHARE = 0.02
# Pass 2 is planned to fill this share of the time left: the pass-1 speed is a measurement, not a promise.
PLAN_SLACK = 0.9
# Rows after which a GPU reports its measured speed (its "first batches").
MEASURE_ROWS = 64


@dataclass(eq=False)
class Job:
    """One fold of one run."""

    run: int
    fold: object  # kagglekit.runs.Fold
    name: str  # "<run>/fold_K", for the log


@dataclass(eq=False)
class Unit:
    """Folds served by one loaded model (an engine), and where it runs: a worker (one GPU, or
    the CPU) on its ``shard`` of the rows, or, with ``device_map``, all GPUs (split) on every row."""

    jobs: list
    backbone: str
    device: str
    worker: int | None = None  # None: split over all GPUs (runs on the main thread)
    device_map: dict | None = None
    shard: object = None  # row indices this unit predicts (None: every row)
    load_s: float | None = None  # measured on its first load

    @property
    def slot(self):
        return self.worker if self.worker is not None else "split"


@dataclass(eq=False)
class RunPlan:
    """One run's part in the passes: its folds' jobs, where its base loads from, its swap TTA and its placement on
    the GPUs (the kernel's plan; None: one worker device)."""

    name: str
    jobs: list
    backbone: str
    mode: str  # tta_mode: full, none or uncertain
    share: float  # predict.tta_share
    placement: object = None


def make_units(plans: list, workers: list, n_rows: int, overrides: list[str] | None = None) -> list:
    """Loaded-model units. Folds of any run sharing a backbone (and its quantization, precision, pooling) form a
    group. A group that fits one GPU is loaded once on every worker, each predicting every fold on its share of the
    rows (row i on worker i mod n: the same mix of lengths on each); a group split over the GPUs is one unit over
    every row."""
    from .engine import group_key
    from .kernel.plan import device_map_for

    groups: dict = {}
    for x in plans:
        split = x.placement is not None and x.placement.kind == "split"
        for job in x.jobs:
            groups.setdefault((split, group_key(job.fold, x.backbone, overrides)), (x, []))[1].append(job)
    units = []
    for (split, _), (x, jobs) in groups.items():
        if split:
            units.append(Unit(jobs, x.backbone, "cuda:0", None, device_map_for(x.placement)))
            continue
        for w, device in enumerate(workers):
            units.append(Unit(jobs, x.backbone, device, w, shard=None if len(workers) == 1 else np.arange(w, n_rows, len(workers))))
    return units


@dataclass
class Budget:
    """Seconds left, counted from ``started`` (the notebook's first cell) with ``clock``."""

    hours: float
    started: float
    clock: object = time.time
    hard_limit_s: float = HARD_LIMIT_S

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.hours * 3600 - self.elapsed()

    def hard_left(self) -> float:
        return self.hard_limit_s - self.elapsed()

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(float("inf"), time.time(), hard_limit_s=float("inf"))


class Meter:
    """What an engine reports its progress to (``on_rows``, after each chunk of rows): counts rows and time; after its
    first batches it calls ``on_first``; ``also`` (a progress bar's advance) hears every chunk too."""

    def __init__(self, clock, on_first=None, first_rows: int = MEASURE_ROWS, also=None):
        self.clock, self.on_first, self.first_rows, self.also = clock, on_first, first_rows, also
        self.rows, self.seconds, self._t0, self._reported = 0, 0.0, None, False

    def start(self):
        self._t0 = self.clock()

    def __call__(self, n):
        if self.also is not None:
            self.also(n)
        now = self.clock()
        if self._t0 is not None:
            self.seconds += now - self._t0
        self._t0 = now
        self.rows += int(n)
        if not self._reported and self.rows >= self.first_rows and self.seconds > 0 and self.on_first is not None:
            self._reported = True
            self.on_first(self.rows / self.seconds)


@dataclass
class Passes:
    """Runs the passes (see the module docstring). ``log(msg)`` prints; ``record()`` is called after
    every event with the JSON-ready state."""

    units: list  # every Unit, in pass-1 order
    workers: list  # device of each worker thread ("cuda:0", "cuda:1" or "cpu")
    test_df: object
    budget: Budget
    log: object = print
    record: object = None
    group_factory: object = None  # (unit) -> engine; tests replace it
    overrides: list | None = None  # --set predict.* for every engine (kk predict / ensemble; the kernel's are in its configs)
    on_rows: object = None  # a progress bar's advance: hears every chunk of rows
    cache: object = field(default_factory=TokenCache)  # every fold and pass tokenizes the rows once
    parts1: dict = field(default_factory=dict)  # (Job, Unit) -> probabilities of the unit's rows, (A,B)
    parts2: dict = field(default_factory=dict)  # (Job, Unit) -> (rows, probabilities mapped back), (B,A)
    timing: dict = field(default_factory=dict)  # (Job, Unit) -> {"pass1_s", "rows", "pass2_s"}
    known2: dict = field(default_factory=dict)  # Job -> (rows, (B,A) probabilities) already known (kk predict's cache)
    stats: dict = field(default_factory=dict)  # Job -> truncation stats of its (A,B) sequences
    skipped: list = field(default_factory=list)  # Jobs pass 1 could not afford
    events: list = field(default_factory=list)
    rates: dict = field(default_factory=dict)  # slot -> rows/s measured on its first batches

    def __post_init__(self):
        self._resident: dict = {}  # slot -> (unit, group)
        self._lock = threading.Lock()

    # --- results ------------------------------------------------------------------------------------------------

    def jobs(self) -> list:
        return list({id(j): j for u in self.units for j in u.jobs}.values())  # in first-seen order

    def _rows(self, unit: Unit):
        return np.arange(len(self.test_df)) if unit.shard is None else np.asarray(unit.shard, dtype=np.int64)

    def first_pass(self) -> dict:
        """Job -> its (A,B) probabilities of every row, for the folds whose every shard completed."""
        out = {}
        for job in self.jobs():
            units = [u for u in self.units if job in u.jobs]
            if job in self.skipped or any((job, u) not in self.parts1 for u in units):
                continue
            p = np.full((len(self.test_df), self.parts1[(job, units[0])].shape[1]), np.nan)
            for u in units:
                p[self._rows(u)] = self.parts1[(job, u)]
            out[job] = p
        return out

    def second_pass(self) -> dict:
        """Job -> (rows, (B,A) probabilities mapped back) of the folds pass 2 ran on (and what was known before)."""
        by_job: dict = {job: [part] for job, part in self.known2.items()}
        for (job, _), (rows, p) in self.parts2.items():
            by_job.setdefault(job, []).append((rows, p))
        out = {}
        for job, parts in by_job.items():
            rows = np.concatenate([r for r, _ in parts])
            order = np.argsort(rows, kind="stable")
            out[job] = (rows[order], np.concatenate([p for _, p in parts])[order])
        return out

    def wanted(self, plans: list) -> dict:
        """Run -> the rows its (B,A) pass should cover: the one rule (kagglekit.tta.second_pass_rows) on the run's
        fold-mean (A,B) probabilities, the uncertainty of what is submitted."""
        from .tta import second_pass_rows

        first = self.first_pass()
        done = [[first[j] for j in x.jobs if j in first] for x in plans]
        return {r: second_pass_rows(x.mode, x.share, np.mean(d, axis=0)) if d else np.zeros(0, np.int64)
                for r, (x, d) in enumerate(zip(plans, done))}

    def fold_probs(self, plans: list, second: bool = True) -> list[list[np.ndarray]]:
        """Per run, per fold that completed pass 1: its probabilities, TTA-averaged where pass 2 ran."""
        from .tta import merge_passes

        first, done2 = self.first_pass(), self.second_pass() if second else {}
        return [[merge_passes(first[j], done2[j][1], done2[j][0]) if j in done2 else first[j].copy() for j in x.jobs if j in first]
                for x in plans]

    def known(self, job: Job, p_ab: np.ndarray) -> None:
        """``job``'s (A,B) probabilities of every row are known already (a cache): pass 1 skips it."""
        for u in self.units:
            if job in u.jobs:
                self.parts1[(job, u)] = p_ab[self._rows(u)]

    # --- loading ------------------------------------------------------------------------------------------------

    def _group(self, unit: Unit):
        """The loaded model of ``unit``: the one still resident in its slot, else freed + loaded."""
        held = self._resident.get(unit.slot)
        if held is not None and held[0] is unit:
            return held[1]
        self._free(unit.slot)
        t = self.budget.clock()
        group = (self.group_factory or self._load)(unit)
        if unit.load_s is None:
            unit.load_s = self.budget.clock() - t
        self._resident[unit.slot] = (unit, group)
        return group

    def _load(self, unit: Unit):
        from .engine import open_engine

        return open_engine([j.fold for j in unit.jobs], unit.backbone, unit.device, unit.device_map, self.overrides)

    def _free(self, slot) -> None:
        held = self._resident.pop(slot, None)
        if held is not None:
            held[1].close()  # collects the model and empties the cache of its own GPU(s) only

    def free_all(self) -> None:
        for slot in list(self._resident):
            self._free(slot)

    # --- one pass -----------------------------------------------------------------------------------------------

    def run_pass(self, number: int, rows_by_run: dict | None = None) -> bool:
        """Pass 1 (``rows_by_run`` None: (A,B), every row) or pass 2 ((B,A) on each run's rows). Returns
        whether it completed (pass 2 stops when it would cross the budget: its results are then unused)."""
        swap = number == 2
        order = self.units if number == 1 else list(reversed(self.units))
        per_worker = {w: [u for u in order if u.worker == w] for w in range(len(self.workers))}
        split = [u for u in order if u.worker is None]
        done = self.first_pass() if swap else {}
        stop = threading.Event()

        def run_units(units: list):
            for unit in units:
                if stop.is_set() or not self._run_unit(unit, swap, rows_by_run, done, stop):
                    return

        # A split model needs every GPU: on pass 1 the per-GPU groups go first, on pass 2 (reversed) the
        # split groups go first, so the group loaded last stays loaded across the two passes.
        for stage in ("workers", "split") if number == 1 else ("split", "workers"):
            if stage == "workers" and any(per_worker.values()):
                if split:
                    self._free("split")
                _in_threads(lambda w: run_units(per_worker[w]), len(self.workers))
            elif stage == "split" and split:
                for w in range(len(self.workers)):
                    self._free(w)
                run_units(split)
        return not stop.is_set()

    def _unit_rows(self, job: Job, unit: Unit, swap: bool, rows_by_run) -> np.ndarray | None:
        """The rows ``unit`` predicts for ``job``: its shard (pass 1), its share of the run's pass-2 rows."""
        if not swap:
            return None if unit.shard is None else self._rows(unit)
        wanted = np.asarray(rows_by_run.get(job.run, ()), dtype=np.int64)
        if job in self.known2:
            wanted = np.setdiff1d(wanted, self.known2[job][0])
        return wanted if unit.shard is None else np.intersect1d(wanted, self._rows(unit))

    def _run_unit(self, unit: Unit, swap: bool, rows_by_run, done: dict, stop) -> bool:
        todo = [j for j in unit.jobs if j not in self.skipped and (j in done if swap else (j, unit) not in self.parts1)]
        if swap:
            todo = [j for j in todo if len(self._unit_rows(j, unit, True, rows_by_run))]
        if not todo:
            return True
        group = self._group(unit)
        n = len(self.test_df)
        for job in todo:
            if stop.is_set():
                return False
            if job in self.skipped:  # another GPU could not afford its shard of this fold
                continue
            rows = self._unit_rows(job, unit, swap, rows_by_run)
            count = n if rows is None else len(rows)
            if not self._affordable(job, unit, count, swap):
                if swap:
                    stop.set()
                    self.log(f"pass 2 stopped before {job.name}: it would end past the {self.budget.hours:g} h budget; "
                             "the pass-1 submission stays")
                    return False
                with self._lock:
                    self.skipped.append(job)
                self.log(f"pass 1: {job.name} SKIPPED, it would end past Kaggle's {KAGGLE_LIMIT_H:g} h limit "
                         f"(the submission has the other folds)")
                continue
            first = None if unit.slot in self.rates else (lambda r, u=unit: self._measured(u, r))
            meter = Meter(self.budget.clock, first, min(MEASURE_ROWS, count), self.on_rows)
            t = self.budget.clock()
            meter.start()
            p = predict_order(group, job.fold, self.test_df, swap, rows, self.cache, meter)
            if not swap:
                self.stats[job] = self.cache.sequences(group.formatter(job.fold), self.test_df)[1]
            seconds = self.budget.clock() - t
            with self._lock:
                if swap:
                    self.parts2[(job, unit)] = (rows, p)
                    self.timing.setdefault((job, unit), {})["pass2_s"] = seconds
                else:
                    self.parts1[(job, unit)] = p
                    self.timing[(job, unit)] = {"pass1_s": seconds, "rows": count, "device": unit.device}
            self.log(f"pass {2 if swap else 1} ({'B,A' if swap else 'A,B'}): {job.name} on {unit.device}: {count} rows "
                     f"in {seconds:.1f} s ({count / max(seconds, 1e-9):.1f} rows/s)")
        return True

    def _measured(self, unit: Unit, rate: float) -> None:
        """First batches done on a GPU: its speed, and what pass 1 will take on it at that speed."""
        with self._lock:
            self.rates[unit.slot] = rate
        rows = sum(len(self._rows(u)) * len(u.jobs) for u in self.units if u.slot == unit.slot)
        hours = rows / rate / 3600
        self.log(f"{unit.device}: {rate:.1f} rows/s on its first batches: pass 1 ~{duration(hours * 3600)} on it "
                 f"({duration(self.budget.elapsed())} used of the {self.budget.hours:g} h budget)")
        self.events.append({"event": "measured", "worker": str(unit.slot), "device": unit.device, "rows_per_s": rate,
                            "pass1_projected_h": hours})
        if self.record is not None:
            self.record()

    def _affordable(self, job: Job, unit: Unit, count: int, swap: bool) -> bool:
        """Pass 2: the fold must end inside the budget (less the reserve to write). Pass 1: inside Kaggle's
        limit, and never refused for a run's first fold."""
        rate = self._rate(job, unit)
        if rate is None:
            return True
        need = count / rate
        if swap:
            return need <= self.budget.left() - WRITE_RESERVE_S
        with self._lock:
            has_fold = any(j.run == job.run and u.slot == unit.slot for j, u in self.parts1)
        return not has_fold or need <= self.budget.hard_left() - WRITE_RESERVE_S

    def _rate(self, job: Job, unit: Unit) -> float | None:
        t = self.timing.get((job, unit))
        if t and t.get("pass1_s"):
            return t["rows"] / t["pass1_s"]
        return self.rates.get(unit.slot)

    # --- pass 2's plan ------------------------------------------------------------------------------------------

    def second_pass_cost(self, rows_by_run: dict, share: float = 1.0) -> float:
        """Seconds pass 2 would take over ``share`` of ``rows_by_run`` at each fold's pass-1 speed, plus
        reloading every group but the resident ones: the GPU threads in parallel, split groups after them."""
        done = self.first_pass()
        per_slot: dict = {}
        for unit in self.units:
            counts = {j: len(self._unit_rows(j, unit, True, rows_by_run)) for j in unit.jobs if j in done}
            counts = {j: c for j, c in counts.items() if c}
            if not counts:
                continue
            held = self._resident.get(unit.slot)
            reload = 0.0 if held is not None and held[0] is unit else (unit.load_s or 0.0)
            work = sum(share * c / (self._rate(j, unit) or float("inf")) for j, c in counts.items())
            per_slot[unit.slot] = per_slot.get(unit.slot, 0.0) + reload + work
        return max((v for k, v in per_slot.items() if k != "split"), default=0.0) + per_slot.get("split", 0.0)


def _in_threads(fn, n: int) -> None:
    """``fn(0) .. fn(n - 1)``, each in a thread of its own (one per GPU, never two GPUs' work in one thread, as a
    pool could do with a short task; one: on this thread); the first exception is raised once all have ended."""
    if n == 1:
        return fn(0)
    errors: list = []

    def run(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"kk-worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def plan_second_pass(passes: Passes, wanted: dict, plans: list) -> tuple[dict, str]:
    """The rows pass 2 can afford: ``wanted`` (run -> rows) if it fits the budget; else, per run, the same
    share of ``wanted``'s least confident rows (by the run's fold-mean pass-1 probabilities), as large as fits;
    else nothing. Returns (run -> rows, a line saying what was decided)."""
    from .tta import uncertain_rows

    wanted = {r: np.asarray(rows, dtype=np.int64) for r, rows in wanted.items() if len(rows)}
    total = sum(len(r) for r in wanted.values())
    if total == 0:
        return {}, "not asked for (predict.tta: false)"
    left = passes.budget.left() - WRITE_RESERVE_S
    available = left * PLAN_SLACK
    cost = passes.second_pass_cost(wanted)
    hours = f"{duration(left)} left of the {passes.budget.hours:g} h budget"
    if cost <= available:
        return wanted, f"on {total} rows (all runs): ~{duration(cost)}, {hours}"
    first = passes.first_pass()
    means = {r: np.mean([first[j] for j in plans[r].jobs if j in first], axis=0) for r in wanted}
    lo, hi = 0.0, 1.0  # the largest share that fits (cost grows with the share)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes.second_pass_cost(wanted, mid) <= available else (lo, mid)

    def cut_to(share):
        cut = {r: rows[uncertain_rows(means[r][rows], share)] for r, rows in wanted.items()}
        return {r: rows for r, rows in cut.items() if len(rows)}

    cut = cut_to(lo)
    while lo >= MIN_SECOND_SHARE and passes.second_pass_cost(cut) > available:  # the chosen rows' real split
        lo *= 0.95
        cut = cut_to(lo)
    if lo < MIN_SECOND_SHARE or not cut:
        return {}, (f"SKIPPED: it needs ~{duration(cost)}, {hours}; the submission stays the one-order (A,B) "
                    "pass")
    return cut, (f"CUT to the {sum(len(r) for r in cut.values())} least confident of {total} rows ({lo:.0%}): all of "
                 f"it needs ~{duration(cost)}, {hours}")
