"""Arena-shaped synthetic data with a learnable signal.

Rows look like the competition's (JSON list cells, multi-turn conversations,
null turns, emoji, short and long texts, repeated prompts) and the label follows
a simple content rule a small model can learn: a response that contains
"quality" words beats one that contains "hedging" words; two hedging responses tie.
A share of labels is flipped at random so the task is not trivially separable.
Deterministic for a seed.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .data import LABEL_COLUMNS

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


def make_synthetic(
    n: int = 500,
    seed: int = 0,
    with_labels: bool = True,
    noise: float = 0.1,
    long_p: float = 0.05,
    null_p: float = 0.02,
    repeat_prompt_p: float = 0.1,
) -> pd.DataFrame:
    """``n`` rows in the competition's CSV format (text cells as JSON strings)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10_000, 10_000 + 50 * n), size=n, replace=False)
    rows = []
    prompts: list[list[str]] = []
    for i in range(n):
        if prompts and rng.random() < repeat_prompt_p:
            prompt = prompts[int(rng.integers(0, len(prompts)))]
        else:
            turns = 1 if rng.random() < 0.75 else int(rng.integers(2, 5))
            prompt = [_text(rng, int(rng.integers(3, 40))) + "?" for _ in range(turns)]
            prompts.append(prompt)
        label = int(rng.choice(3, p=[0.35, 0.34, 0.31]))
        if label == 0:
            good_a, good_b = True, False
        elif label == 1:
            good_a, good_b = False, True
        else:
            # A tie is "both bad" (the arena's most common tie): the presence of any quality
            # word separates ties from wins, while who wins needs the A/B position.
            good_a = good_b = False
        resp_a = [_response(rng, good_a, long_p) for _ in prompt]
        resp_b = [_response(rng, good_b, long_p) for _ in prompt]
        for resp in (resp_a, resp_b):
            for t in range(len(resp)):
                if rng.random() < null_p:
                    resp[t] = None
        if rng.random() < noise:
            label = int(rng.integers(0, 3))
        models = rng.choice(MODELS, size=2, replace=False)
        row = {
            "id": int(ids[i]),
            "model_a": str(models[0]),
            "model_b": str(models[1]),
            "prompt": json.dumps(prompt),
            "response_a": json.dumps(resp_a),
            "response_b": json.dumps(resp_b),
        }
        if with_labels:
            for j, col in enumerate(LABEL_COLUMNS):
                row[col] = int(label == j)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not with_labels:
        df = df[["id", "prompt", "response_a", "response_b"]]
    return df
