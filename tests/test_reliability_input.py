"""Hostile inputs and damaged files (issue 24, items 9-11, 13, 14, 17-19, 23-25): each case is one line naming
the file, row or key, never a traceback, a hang or a memory blow-up. Each test failed on the code before its fix."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.errors import KKError


def _one_error_line(r, *needles: str) -> str:
    """The command failed with exactly one `error:` line holding every needle, and no traceback."""
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert str(n) in errors[0], errors[0]
    return errors[0]


# --- 9. a YAML alias bomb -------------------------------------------------------------------------------------------

def _alias_bomb(levels: int = 6) -> str:
    """~450 bytes that expand to 9**levels list items through nested anchors ("billion laughs")."""
    keys = ["model.max_length", "lora.r", "lora.alpha", "lora.dropout", "train.epochs", "train.warmup_ratio", "train.weight_decay"]
    lines = ["name: bomb", "tune:", f"  {keys[0]}:", "    choices: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines += [f"  {keys[i]}:", f"    choices: &a{i} [{refs}]"]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, tiny_project):
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb(levels=5))  # 9**5 = 59,049 items: the old reader accepted it after seconds of work
    r = run_cli("config", p)
    _one_error_line(r, str(p), "line 6", "aliases")
    r = run_cli("train", "--fold", "0", "--config", p, "--run", tmp_path / "run")
    _one_error_line(r, str(p), "aliases")
    assert not (tmp_path / "run").exists()
    # --set values go through the same reader
    r = run_cli("config", "--set", "tune.lora.r={choices: &x [8, 16]}", "--set", "tune.lora.alpha={choices: *x}")
    _one_error_line(r, "--set tune.lora.alpha", "aliases")
    # and absurd nesting is one line, not a RecursionError
    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "deep.yaml").write_text(f"name: x\nseed: {deep}\n")
    _one_error_line(run_cli("config", tmp_path / "deep.yaml"), "deep.yaml", "nested too deeply")
    _one_error_line(run_cli("config", "--set", f"seed={deep}"), "--set seed", "nested too deeply")


def test_configs_kagglekit_writes_have_no_aliases(tmp_path):
    from kagglekit.config import load_config

    cfg = load_config(None, ["tune.lora.r={choices: [8, 16]}"])
    shared = [1, 2]
    cfg.tune["lora.r"].choices = shared
    cfg.tune["lora.alpha"] = cfg.tune["lora.r"].model_copy(update={"choices": shared})  # one list under two keys
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert "&" not in cfg.to_yaml()
    assert load_config(tmp_path / "c.yaml").tune["lora.alpha"].choices == [1, 2]


# --- 10. one huge text cell -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deberta_tokenizer(tiny_project):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_project / "deberta")


@pytest.mark.parametrize("strategy", ["head_tail", "left", "right"])
def test_a_huge_cell_is_cut_by_characters_before_tokenizing(deberta_tokenizer, strategy, monkeypatch):
    from kagglekit import formatting
    from kagglekit.formatting import Formatter

    words = "the model answer is correct and the other one is wrong because".split()
    rng = np.random.default_rng(0)
    huge = " ".join(rng.choice(words, 60_000))  # ~300,000 characters, ~60,000 tokens
    df = pd.DataFrame({"prompt": [["which is better"]], "response_a": [[huge]], "response_b": [["a short answer"]]})
    fmt = Formatter(deberta_tokenizer, 96, strategy)

    seen = []

    class Spy:
        def __call__(self, texts, **kw):
            seen.extend([texts] if isinstance(texts, str) else texts)
            return deberta_tokenizer(texts, **kw)

        def __getattr__(self, name):
            return getattr(deberta_tokenizer, name)

    fmt.tokenizer = Spy()
    enc = fmt.encode_rows(df)
    seqs, stats = fmt.sequences(enc)
    limit = formatting.CHARS_PER_TOKEN * fmt.budget
    assert max(map(len, seen)) <= 2 * limit < len(huge) / 100  # bounded work, whatever the cell's size
    assert stats.summary()["rows_cut_by_characters"] == 1
    # the kept tokens are exactly those of the uncut tokenization
    fmt.tokenizer = deberta_tokenizer
    monkeypatch.setattr(formatting, "CHARS_PER_TOKEN", 10**9)
    full_seqs, full_stats = fmt.sequences(fmt.encode_rows(df))
    assert full_stats.summary()["rows_cut_by_characters"] == 0
    assert [s.tolist() for s in seqs] == [s.tolist() for s in full_seqs]
    assert (stats.kept == full_stats.kept).all()
    # the total is an estimate within a few percent of the true count
    assert abs(stats.total[0, 1] - full_stats.total[0, 1]) / full_stats.total[0, 1] < 0.05
    # and swapped, the estimate follows its field
    _, swapped = fmt.sequences(enc, swap=True)
    assert swapped.total[0, 2] == stats.total[0, 1]


def test_normal_rows_are_not_cut(deberta_tokenizer):
    from kagglekit.formatting import Formatter
    from kagglekit.synthetic import make_synthetic

    raw = make_synthetic(40, seed=4, long_p=0.3)
    df = pd.DataFrame({c: [json.loads(v) for v in raw[c]] for c in ("prompt", "response_a", "response_b")})
    df = df.map(lambda turns: ["" if t is None else t for t in turns])
    enc = Formatter(deberta_tokenizer, 512).encode_rows(df)
    assert enc.char_ratio is None


# --- 11. absurd token budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["train.max_tokens", "predict.max_tokens"])
def test_a_token_budget_of_1e22_is_refused(key):
    r = run_cli("config", "--set", f"{key}={10**22}")
    _one_error_line(r, key, "token budget up to")
    assert run_cli("config", "--set", f"{key}=65536").exit_code == 0
