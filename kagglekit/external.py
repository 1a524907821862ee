"""Other preference data in a competition's format (the task's: kagglekit/task.py).

Anthropic's HH-RLHF (``{"chosen": transcript, "rejected": transcript}`` per JSON line,
transcripts of ``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."`` turns) becomes arena
rows: ``prompt`` = the human turns, ``response_a``/``response_b`` = the assistant turns
of the chosen and the rejected transcript in a random (seeded) order, label = which of
the two was chosen. No ties. The cells and the label are written as the task stores them
(LMSYS: JSON lists of turns and one-hot ``winner_*``; WSDM: plain strings, turns joined
by a blank line, and ``winner``). Used by the quality benchmark and its CI test; useful as
extra (pseudo-labelled or pre-training) data too.

In HH-RLHF the two transcripts share every turn but the last assistant one, so a model
only learns if it sees the *end* of the responses: use ``model.truncation: left``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import KKError
from .task import LMSYS, Task

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def split_transcript(text: str) -> tuple[list[str], list[str]]:
    """(human turns, assistant turns) of equal length; a missing answer is an empty turn."""
    parts = _TURN.split(text)
    human, assistant = [], []
    # parts = [preamble, role, text, role, text, ...]
    for role, turn in zip(parts[1::2], parts[2::2]):
        turn = turn.strip()
        if role == "Human":
            human.append(turn)
            assistant.append("")
        elif not human:  # an assistant turn before any human one: pair it with an empty prompt
            human.append("")
            assistant.append(turn)
        else:
            assistant[-1] = (assistant[-1] + "\n\n" + turn).strip()
    return human, assistant


def hh_pairs(path: str | os.PathLike):
    """Yield ``(line number, prompt turns, chosen turns, rejected turns)`` of an HH-RLHF file, or
    ``(line number, None, None, None)`` for a pair whose transcripts have different shapes (no comparison)."""
    path = Path(path)
    if not path.is_file():
        raise KKError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                chosen, rejected = rec["chosen"], rec["rejected"]
                prompt, good = split_transcript(chosen)
                _, bad = split_transcript(rejected)
            except (ValueError, KeyError, TypeError):
                raise KKError(f"{path}: line {n} is not a JSON object with 'chosen' and 'rejected' transcripts") from None
            if not prompt or len(bad) != len(good):
                yield n, None, None, None
            else:
                yield n, prompt, good, bad


def read_hh_rlhf(path: str | os.PathLike, seed: int = 0, limit: int | None = None, task: Task = LMSYS):
    """HH-RLHF pairs as a train frame of ``task``'s competition (its cells and label columns)."""
    import pandas as pd

    path = Path(path)
    rows = []
    rng = np.random.default_rng(seed)
    for n, prompt, good, bad in hh_pairs(path):
        if prompt is None:
            continue  # transcripts of different shapes: no pairwise comparison
        a_wins = bool(rng.integers(2))
        a, b = (good, bad) if a_wins else (bad, good)
        label = {c: v[0] for c, v in task.label_cells([0 if a_wins else 1]).items()}  # class 0 = A wins, 1 = B
        rows.append({
            "id": f"hh{n}",
            "model_a": "chosen" if a_wins else "rejected",
            "model_b": "rejected" if a_wins else "chosen",
            "prompt": task.encode_cell(prompt),
            "response_a": task.encode_cell(a),
            "response_b": task.encode_cell(b),
            **{c: (int(v) if task.one_hot_labels else v) for c, v in label.items()},
        })
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise KKError(f"{path}: no usable chosen/rejected pairs")
    return pd.DataFrame(rows)


def preference_set(hh_path: str | os.PathLike, arena_paths=(), seed: int = 0, limit: int | None = None, task: Task = LMSYS):
    """HH-RLHF pairs plus real arena train files of ``task``'s competition (CSV or parquet, raw cells kept)
    as one train frame, shuffled."""
    import pandas as pd

    from .data import read_raw

    frames = [read_hh_rlhf(hh_path, seed=seed, limit=limit, task=task)]
    keep = (*task.train_columns, "model_a", "model_b", *([task.language_column] if task.language_column else []))
    for p in arena_paths:
        df = read_raw(p, "train")
        missing = [c for c in task.train_columns if c not in df.columns]
        if missing:
            raise KKError(f"{p}: missing column {', '.join(missing)}")
        frames.append(df[[c for c in df.columns if c in keep]])
    out = pd.concat(frames, ignore_index=True)
    return out.sample(frac=1.0, random_state=seed).reset_index(drop=True)
