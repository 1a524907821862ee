from __future__ import annotations

import subprocess
import sys

import pytest

from kagglekit.tiny import unigram_vocab

BUILD = """
import sys
from kagglekit.tiny import build_tiny_model
build_tiny_model(sys.argv[1], sys.argv[2], vocab_size=300)
"""


@pytest.mark.parametrize("arch", ["deberta-v2", "llama"])
def test_tiny_model_is_identical_across_processes(tmp_path, arch):
    # Each process has its own hash seeds: a tokenizer trainer that breaks ties by hash order differs.
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / name), arch], check=True, capture_output=True)
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_unigram_vocab_keeps_frequent_words_whole():
    vocab = unigram_vocab(["the cat the dog the cat", "emoji 😀"], 100, ["[PAD]", "[UNK]"])
    pieces = [p for p, _ in vocab]
    assert pieces[:2] == ["[PAD]", "[UNK]"]
    assert pieces.index("\u2581the") < pieces.index("\u2581cat") < pieces.index("\u2581dog")
    assert "😀" in pieces and "\u2581😀" in pieces  # any character can still be spelled out
    assert len(pieces) == len(set(pieces))


def test_tiny_model_cli_and_bad_arch(tmp_path):
    from conftest import run_cli

    r = run_cli("tiny-model", tmp_path / "m", "--arch", "llama", "--vocab-size", "300")
    assert r.exit_code == 0 and (tmp_path / "m" / "config.json").exists()
    r = run_cli("tiny-model", tmp_path / "x", "--arch", "gpt9")
    assert r.exit_code == 1 and "--arch must be one of deberta-v2, llama" in r.stderr
