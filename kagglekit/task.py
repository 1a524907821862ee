"""What is specific to one competition, in one place: columns, cells, labels, classes, the A/B swap, the metric (a
:class:`Metric`: name, function, direction, what it scores), the files and the submission (README, "Tasks").

``lmsys`` (3 classes, JSON-list cells, CSV, log loss, three probabilities) and ``wsdm`` (2 classes, plain cells, a
language column, parquet, accuracy, ``id,winner``). Log loss is always reported beside a task's metric, and blend
weights and temperatures are fitted on it. Code takes the task from the config (``get_task(cfg.task)``) or as an
argument defaulting to :data:`LMSYS`; there is no global state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import KKError


@dataclass(frozen=True)
class Metric:
    """What a competition scores, declared once: early stopping, ``kk tune``'s direction, reports and
    metrics.json's ``val_<name>`` all follow it. ``fn(x, labels)`` gets the probabilities (``scores="probs"``)
    or the predicted classes (``scores="labels"``)."""

    name: str
    fn: Callable
    higher_is_better: bool = False
    scores: str = "probs"

    def __call__(self, probs: np.ndarray, labels) -> float:
        probs = np.asarray(probs)
        return float(self.fn(probs if self.scores == "probs" else probs.argmax(axis=1), np.asarray(labels)))

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")


def _log_loss(probs, labels) -> float:
    from .metrics import log_loss

    return log_loss(probs, labels)


LOG_LOSS = Metric("log_loss", _log_loss)
ACCURACY = Metric("accuracy", lambda pred, labels: (pred == labels).mean(), higher_is_better=True, scores="labels")


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # the competition's name, for help texts and reports
    competition: str  # Kaggle slug: the kernel's competition source and its input folder
    text_columns: tuple[str, ...]  # prompt, first response, second response
    label_columns: tuple[str, ...]  # one-hot label columns in class order, or the one categorical label column
    prob_columns: tuple[str, ...]  # probability columns of OOF/test/soft-label files (and a probability submission)
    class_names: tuple[str, ...]  # short names for tables (A, B, tie)
    swap: tuple[int, ...]  # class j of a pair with A and B exchanged is class swap[j] of the original
    metric: Metric  # what early stopping, tuning and reports optimise
    cells: str = "json_turns"  # how text cells are stored: "json_turns" (JSON lists of turns) or "plain" (one string)
    label_values: tuple[str, ...] = ()  # a categorical label: the label column's value of each class; () = one-hot
    train_file: str = "train.csv"  # the competition's file names (the reader itself goes by the suffix)
    test_file: str = "test.csv"
    submission: str = "probs"  # "probs": id + prob_columns; "labels": id + the label column (argmax, label_values)
    language_column: str | None = None  # a column to stratify folds by and to break accuracy down by

    def __post_init__(self):
        n = len(self.class_names)
        if sorted(self.swap) != list(range(n)) or len(self.prob_columns) != n:
            raise ValueError(f"task {self.name}: swap and prob_columns must cover the {n} classes")
        if self.label_values and (len(self.label_columns) != 1 or len(self.label_values) != n):
            raise ValueError(f"task {self.name}: a categorical label is one column with a value per class")
        if not self.label_values and len(self.label_columns) != n:
            raise ValueError(f"task {self.name}: one-hot labels need a column per class")

    # --- classes ---------------------------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def one_hot(self, labels) -> np.ndarray:
        """(n, n_classes) float array of hard labels."""
        return np.eye(self.n_classes)[np.asarray(labels, dtype=np.int64)]

    def swap_probs(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities of the swapped pair mapped back to the original order (and vice versa)."""
        return probs[:, list(self.swap)]

    def swap_labels(self, labels) -> np.ndarray:
        """Class indices of the pairs with A and B exchanged (-1, no label, stays -1)."""
        inverse = np.argsort(self.swap)  # class i of the original is class inverse[i] of the swapped pair
        labels = np.asarray(labels, dtype=np.int64)
        return np.where(labels >= 0, inverse[np.clip(labels, 0, None)], -1)

    # --- columns and cells -----------------------------------------------------------------------------------------

    @property
    def one_hot_labels(self) -> bool:
        return not self.label_values

    @property
    def train_columns(self) -> tuple[str, ...]:
        return ("id", *self.text_columns, *self.label_columns)

    @property
    def test_columns(self) -> tuple[str, ...]:
        return ("id", *self.text_columns)

    def label_of(self, raw_values: tuple) -> int:
        """The class index of one row from the raw values of its label columns; ValueError with a short
        reason when they are not a label (not one-hot; not one of label_values)."""
        if not self.one_hot_labels:
            col, raw = self.label_columns[0], raw_values[0]
            value = "" if raw is None else str(raw).strip().lower()  # model_a, "model_a " and "Model_A" alike
            if value not in self.label_values:
                raise ValueError(f"label {col}={raw!r} is not one of {', '.join(self.label_values)}")
            return self.label_values.index(value)
        values = []
        for col, raw in zip(self.label_columns, raw_values):
            try:
                values.append(float(raw))
            except (TypeError, ValueError):
                raise ValueError(f"label {col}={raw!r} is not a number") from None
        if sorted(values) != [0.0] * (self.n_classes - 1) + [1.0]:
            shown = ", ".join(f"{c}={r}" for c, r in zip(self.label_columns, raw_values))
            raise ValueError(f"labels are not one-hot ({shown})")
        return values.index(1.0)

    def label_cells(self, labels) -> dict:
        """The label columns of a train file for these class indices: one-hot ints, or the categorical values."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.one_hot_labels:
            return {c: (labels == j).astype(int) for j, c in enumerate(self.label_columns)}
        return {self.label_columns[0]: np.asarray(self.label_values, dtype=object)[labels]}

    def encode_cell(self, turns: list[str]) -> str:
        """A text cell as this competition's files store it: a JSON list of turns, or one plain string
        (turns joined by a blank line: a plain-text competition has one turn; more are context)."""
        if self.cells == "plain":
            return "\n\n".join("" if t is None else t for t in turns)
        return json.dumps(turns, ensure_ascii=False)

    # --- metric ----------------------------------------------------------------------------------------------------

    def improves(self, loss: float, value: float, best_loss: float, best_value: float | None) -> bool:
        """Whether an evaluation (log loss, the task's metric) beats the best so far: a better metric, or at an equal
        one (small validation sets tie often on accuracy) the lower log loss. An evaluation whose log loss is not
        finite never wins (NaN probabilities still have an argmax)."""
        if not (np.isfinite(loss) and np.isfinite(value)):
            return False
        return best_value is None or self.metric.better(value, best_value) or (value == best_value and loss < best_loss)

    # --- submission ------------------------------------------------------------------------------------------------

    @property
    def submission_columns(self) -> tuple[str, ...]:
        return self.prob_columns if self.submission == "probs" else self.label_columns

    def prob_frame(self, ids, probs: np.ndarray):
        """``id`` + the probability columns: OOF, test predictions, soft labels (and a probability submission)."""
        import pandas as pd

        return pd.DataFrame({"id": ids, **{c: probs[:, j] for j, c in enumerate(self.prob_columns)}})

    def submission_frame(self, ids, probs: np.ndarray):
        """The submission as Kaggle scores it: probabilities, or the argmax class's label value."""
        import pandas as pd

        if self.submission == "probs":
            return self.prob_frame(ids, probs)
        return pd.DataFrame({"id": ids, **self.label_cells(np.asarray(probs).argmax(axis=1))})

    def sample_submission(self, ids):
        """A frame shaped like the competition's sample_submission.csv (uniform probabilities, or the first label)."""
        return self.submission_frame(ids, np.full((len(ids), self.n_classes), 1.0 / self.n_classes))


LMSYS = Task(
    name="lmsys",
    title="LLM Classification Finetuning (LMSYS Chatbot Arena)",
    competition="llm-classification-finetuning",
    text_columns=("prompt", "response_a", "response_b"),
    label_columns=("winner_model_a", "winner_model_b", "winner_tie"),
    prob_columns=("winner_model_a", "winner_model_b", "winner_tie"),
    class_names=("A", "B", "tie"),
    swap=(1, 0, 2),
    metric=LOG_LOSS,
)

WSDM = Task(
    name="wsdm",
    title="WSDM Cup 2025 Multilingual Chatbot Arena",
    competition="wsdm-cup-multilingual-chatbot-arena",
    text_columns=("prompt", "response_a", "response_b"),
    label_columns=("winner",),
    prob_columns=("winner_model_a", "winner_model_b"),
    class_names=("A", "B"),
    swap=(1, 0),
    metric=ACCURACY,
    cells="plain",
    label_values=("model_a", "model_b"),
    train_file="train.parquet",
    test_file="test.parquet",
    submission="labels",
    language_column="language",
)

TASKS: dict[str, Task] = {t.name: t for t in (LMSYS, WSDM)}


def get_task(name: str | Task = "lmsys") -> Task:
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise KKError(f"task {name!r} is not known (known: {', '.join(TASKS)})") from None


def same_task(names, what: str = "runs") -> Task:
    """The one task of several runs (or folds); mixing competitions is an error."""
    tasks = {get_task(n).name for n in names}
    if len(tasks) > 1:
        raise KKError(f"the {what} belong to different tasks ({', '.join(sorted(tasks))}); combine runs of one competition")
    return get_task(tasks.pop() if tasks else "lmsys")
