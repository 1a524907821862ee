"""Keys that find the same comparison in two data sets, whatever its spacing, case or A/B order.

Extra training data (``kk data import``, ``data.extra``) often repeats rows of the competition's own
train or test file: the public arena sets and the competition's data come from the same battles. A
duplicate of a validation row in the training rows makes the fold's score a memory test, so rows are
matched by

- :func:`pair_key`: the prompt and both responses, normalised (whitespace runs collapsed, ends
  stripped, case folded), the two responses as an unordered pair (A/B exchanged is the same row);
- :func:`prompt_key`: the normalised prompt alone: a row whose prompt is in fold K's validation rows
  never trains fold K's model (the same rule ``kk make-folds`` applies by grouping folds by prompt).
"""

from __future__ import annotations

import hashlib
import json

_SEP = "\x1f"  # between turns: a character no normalised text keeps


def normalise(turns) -> str:
    """One string for a list of turns (or a string): whitespace collapsed, case folded."""
    if isinstance(turns, str):
        turns = [turns]
    return _SEP.join(" ".join(("" if t is None else str(t)).split()).casefold() for t in turns)


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def prompt_key(prompt) -> str:
    return _digest(normalise(prompt))


def pair_key(prompt, response_a, response_b) -> str:
    """The same for (prompt, A, B) and (prompt, B, A)."""
    return _digest([normalise(prompt), sorted([normalise(response_a), normalise(response_b)])])


def frame_keys(df, columns=None) -> tuple[list[str], list[str]]:
    """(pair keys, prompt keys) of a frame with parsed turn lists; ``columns``: its (prompt, first response,
    second response) columns, by default the task's text columns."""
    if columns is None:
        from .task import get_task

        columns = get_task().text_columns
    p_col, a_col, b_col = columns
    pairs = [pair_key(p, a, b) for p, a, b in zip(df[p_col], df[a_col], df[b_col])]
    return pairs, [prompt_key(p) for p in df[p_col]]
