"""What is specific to one competition, in one place: columns, classes, the A/B swap, the metric.

kagglekit serves a family of Kaggle "which response wins" competitions. Everything that differs
between them lives in a :class:`Task`; the rest of the code asks the task instead of hard-coding
three classes or the LMSYS column names. Chosen in the config (``task: lmsys``) and recorded in
every run.

- ``lmsys``: LLM Classification Finetuning (LMSYS Chatbot Arena): 3 classes (A, B, tie),
  one-hot ``winner_model_a/b/tie`` columns, text cells are JSON lists of turns, log loss.

New code takes the task from the config: ``get_task(cfg.task)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KKError


@dataclass(frozen=True)
class Task:
    name: str
    text_columns: tuple[str, ...]  # prompt, first response, second response
    label_columns: tuple[str, ...]  # one-hot label columns of train.csv, in class order
    prob_columns: tuple[str, ...]  # probability columns of OOF/test/soft-label files and the submission
    class_names: tuple[str, ...]  # short names for tables (A, B, tie)
    swap: tuple[int, ...]  # class j of a pair with A and B exchanged is class swap[j] of the original
    metric: str  # what early stopping, tuning and reports optimise: "log_loss" or "accuracy"
    cells: str = "json_turns"  # how text cells are stored: JSON lists of turns, or plain strings

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def one_hot(self, labels) -> np.ndarray:
        """(n, n_classes) float array of hard labels."""
        return np.eye(self.n_classes)[np.asarray(labels, dtype=np.int64)]

    def swap_probs(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities of the swapped pair mapped back to the original order (and vice versa)."""
        return probs[:, list(self.swap)]


LMSYS = Task(
    name="lmsys",
    text_columns=("prompt", "response_a", "response_b"),
    label_columns=("winner_model_a", "winner_model_b", "winner_tie"),
    prob_columns=("winner_model_a", "winner_model_b", "winner_tie"),
    class_names=("A", "B", "tie"),
    swap=(1, 0, 2),
    metric="log_loss",
)

TASKS: dict[str, Task] = {t.name: t for t in (LMSYS,)}


def get_task(name: str = "lmsys") -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KKError(f"task {name!r} is not known (known: {', '.join(TASKS)})") from None
