"""Arena-shaped synthetic data with a learnable signal.

Rows look like the competition's (JSON list cells, multi-turn conversations,
null turns, emoji, short and long texts, repeated prompts) and the label follows
a simple content rule a small model can learn: a response that contains
"quality" words beats one that contains "hedging" words; two hedging responses tie.
A share of labels is flipped at random so the task is not trivially separable.
Deterministic for a seed.

The shape follows the task: LMSYS rows have JSON-list cells and one-hot ``winner_*``
columns; WSDM rows have plain-string cells (one turn), a ``winner`` column (model_a /
model_b, no tie: two bad responses are decided at random) and a ``language`` column.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .task import LMSYS, Task

FILLER = (
    "the a of to and in is that it for on with as was this be by are from or an at have not "
    "model answer question data python code function value list result time people world water "
    "history science music light energy system number example reason story city country river "
    "explain write describe compare summarize translate calculate list define suggest "
    "first second then next finally however because therefore also often usually simply"
).split()
GOOD = "excellent thorough accurate precise detailed insightful helpful correct".split()
BAD = "unsure sorry cannot unclear wrong vague incomplete refuse".split()
EMOJI = ["😀", "🚀", "🎉", "👍", "🤖", "🌍", "🔥", "✨"]
# WSDM's languages, roughly in the shares of its train set (English about half).
LANGUAGES = ["English", "Russian", "Chinese", "Vietnamese", "German", "Spanish", "Japanese", "Korean"]
LANGUAGE_P = [0.52, 0.13, 0.1, 0.06, 0.06, 0.05, 0.05, 0.03]
MODELS = ["gpt-4-1106-preview", "claude-2.1", "llama-2-70b-chat", "mixtral-8x7b-instruct", "gemini-pro", "vicuna-13b"]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return list(rng.choice(FILLER, size=n))


def _text(rng: np.random.Generator, n: int, emoji_p: float = 0.1) -> str:
    words = _words(rng, n)
    if rng.random() < emoji_p:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(EMOJI)))
    return " ".join(words)


def _length(rng: np.random.Generator, long_p: float) -> int:
    # Mostly short, a heavy tail of long answers that must be truncated.
    if rng.random() < long_p:
        return int(rng.integers(250, 600))
    return int(np.clip(rng.lognormal(3.3, 0.6), 3, 200))


def _response(rng: np.random.Generator, good: bool, long_p: float, density: float = 0.15) -> str:
    marker = GOOD if good else BAD
    words = _words(rng, _length(rng, long_p))
    # Signal words are spread through the text (about `density` of the words) and sit at
    # both ends, so head, tail and head+tail truncation all keep some of them.
    for j in np.flatnonzero(rng.random(len(words)) < density):
        words[j] = str(rng.choice(marker))
    words = [str(rng.choice(marker))] + words + [str(rng.choice(marker))]
    if rng.random() < 0.1:
        words.insert(len(words) // 2, str(rng.choice(EMOJI)))
    return " ".join(words)


def make_synthetic(n: int = 500, seed: int = 0, with_labels: bool = True, noise: float = 0.1, long_p: float = 0.05,
                   null_p: float = 0.02, repeat_prompt_p: float = 0.1, task: Task = LMSYS) -> pd.DataFrame:
    """``n`` rows in the competition's format (text cells as JSON strings or plain strings, as ``task``
    stores them); :func:`kagglekit.io.write_table` writes them as CSV or parquet."""
    if n < 1:
        raise ValueError("n must be at least 1")
    plain = task.cells == "plain"
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10_000, 10_000 + 50 * n), size=n, replace=False)
    rows = []
    labels = []
    prompts: list[list[str]] = []
    for i in range(n):
        if prompts and rng.random() < repeat_prompt_p:
            prompt = prompts[int(rng.integers(0, len(prompts)))]
        else:
            turns = 1 if plain or rng.random() < 0.75 else int(rng.integers(2, 5))  # plain cells: one turn
            prompt = [_text(rng, int(rng.integers(3, 40))) + "?" for _ in range(turns)]
            prompts.append(prompt)
        label = int(rng.choice(3, p=[0.35, 0.34, 0.31]))
        # A tie (label 2) is "both bad" (the arena's most common tie): the presence of any quality
        # word separates ties from wins, while who wins needs the A/B position.
        resp_a = [_response(rng, label == 0, long_p) for _ in prompt]
        resp_b = [_response(rng, label == 1, long_p) for _ in prompt]
        resp_a, resp_b = ([None if rng.random() < null_p else r for r in resp] for resp in (resp_a, resp_b))
        if rng.random() < noise:
            label = int(rng.integers(0, 3))
        if label >= task.n_classes:
            label = int(rng.integers(0, task.n_classes))  # no ties in this competition: the judge picks one
        models = rng.choice(MODELS, size=2, replace=False)
        row = {
            "id": f"{int(ids[i]):08x}" if plain else int(ids[i]),
            "model_a": str(models[0]),
            "model_b": str(models[1]),
            # Plain cells are one string (None where the turn is null, as a parquet null); else JSON lists.
            "prompt": prompt[0] if plain else json.dumps(prompt),
            "response_a": resp_a[0] if plain else json.dumps(resp_a),
            "response_b": resp_b[0] if plain else json.dumps(resp_b),
        }
        if task.language_column:
            row[task.language_column] = str(rng.choice(LANGUAGES, p=LANGUAGE_P))
        rows.append(row)
        labels.append(label)
    df = pd.DataFrame(rows)
    if not with_labels:
        return df[list(task.test_columns)]
    for col, values in task.label_cells(labels).items():
        df[col] = values
    extra = [c for c in df.columns if c not in task.train_columns]
    return df[[*task.train_columns, *extra]] if plain else df
