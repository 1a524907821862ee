from __future__ import annotations

import pandas as pd
import pytest

from kagglekit.formatting import FIELDS, Formatter, allocate, cut


@pytest.mark.parametrize(
    "lengths, budget",
    [([10, 500, 30], 100), ([10, 20, 30], 100), ([100, 100, 100], 101), ([0, 100, 100], 50), ([300, 5, 900], 64), ([1, 1, 1], 2)],
)
def test_allocate_respects_budget_and_needs(lengths, budget):
    alloc = allocate(lengths, [0.2, 0.4, 0.4], budget)
    assert sum(alloc) == min(budget, sum(lengths))
    assert all(0 <= a <= n for a, n in zip(alloc, lengths))


def test_unused_share_flows_to_the_others():
    # The prompt needs 10 of its 20 tokens: the 10 left go to the responses.
    assert allocate([10, 500, 500], [0.2, 0.4, 0.4], 100) == [10, 45, 45]
    assert allocate([10, 500, 30], [0.2, 0.4, 0.4], 100) == [10, 60, 30]


def test_cut_strategies():
    t = list(range(10))
    assert cut(t, 5, "head_tail") == [0, 1, 2, 8, 9]
    assert cut(t, 5, "left") == [5, 6, 7, 8, 9]
    assert cut(t, 5, "right") == [0, 1, 2, 3, 4]
    assert cut(t, 20, "left") == t and cut(t, 0, "right") == []


@pytest.fixture(scope="module")
def tokenizer(tiny_project):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_project / "deberta")


def _frame(prompt, a, b):
    return pd.DataFrame({"prompt": [prompt], "response_a": [a], "response_b": [b]})


@pytest.mark.parametrize("strategy", ["head_tail", "left", "right"])
def test_every_sequence_fits_and_retention_is_reported(tokenizer, strategy):
    import json

    from kagglekit.synthetic import make_synthetic

    raw = make_synthetic(60, seed=4, long_p=0.3)
    df = pd.DataFrame({c: [json.loads(v) for v in raw[c]] for c in FIELDS})
    df = df.map(lambda turns: ["" if t is None else t for t in turns])
    fmt = Formatter(tokenizer, 80, strategy)
    seqs, stats = fmt.sequences(fmt.encode_rows(df))
    assert max(len(s) for s in seqs) <= 80
    assert (stats.kept <= stats.total).all()
    summary = stats.summary()
    assert 0 < summary["share_truncated"] <= 1
    assert all(0 < r <= 1 for r in summary["retention"].values())
    assert summary["rows"] == 60


def test_sequence_layout_and_turn_order(tokenizer):
    fmt = Formatter(tokenizer, 512)
    text = fmt.format_text(["first question", "second question"], ["answer one", "answer two"], ["other one", "other two"])
    order = [text.index(s) for s in ("<PROMPT>", "first", "second", "<A>", "answer one", "answer two", "<B>", "other one", "other two")]
    assert order == sorted(order)
    assert text.count("<TURN>") == 3
    assert text.startswith("[CLS]") and text.rstrip().endswith("[SEP]")


def test_left_truncation_keeps_the_last_turn(tokenizer):
    long_turn = " ".join(["river"] * 300)
    fmt = Formatter(tokenizer, 64, "left")
    text = fmt.format_text([long_turn, "final question"], [long_turn, "final answer"], [long_turn, "final other"])
    assert "final question" in text and "final answer" in text and "final other" in text
    fmt = Formatter(tokenizer, 64, "right")
    text = fmt.format_text([long_turn, "final question"], [long_turn, "final answer"], [long_turn, "final other"])
    assert "final answer" not in text


def test_swap_exchanges_the_responses(tokenizer):
    fmt = Formatter(tokenizer, 128)
    df = _frame(["p"], ["alpha"], ["omega"])
    enc = fmt.encode_rows(df)
    ab, _ = fmt.assemble(enc, 0, swap=False)
    ba, _ = fmt.assemble(enc, 0, swap=True)
    assert len(ab) == len(ba) and list(ab) != list(ba)
    text = tokenizer.decode(ba.tolist())
    assert text.index("omega") < text.index("alpha")


def test_decoder_sequences_end_with_a_fixed_marker(tiny_project):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_project / "llama")
    fmt = Formatter(tok, 64)
    df = _frame(["q"], ["a " * 100], ["b " * 100])
    seqs, _ = fmt.sequences(fmt.encode_rows(df))
    assert list(seqs[0][-len(fmt.end):]) == list(fmt.end)  # last-token pooling sees the same token everywhere


def test_max_length_too_small_is_an_error(tokenizer):
    from kagglekit.errors import KKError

    overhead = 512 - Formatter(tokenizer, 512).budget  # special tokens and field headers
    with pytest.raises(KKError, match=f"max_length={overhead + 2} leaves no room"):
        Formatter(tokenizer, overhead + 2)
    assert Formatter(tokenizer, overhead + 3).budget == 3


def test_max_turns_keeps_the_last_turns():
    import tempfile

    import pandas as pd

    from kagglekit.formatting import Formatter
    from kagglekit.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        build_tiny_model(d, "deberta-v2", vocab_size=300)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
    df = pd.DataFrame({"prompt": [["first question", "second question"]], "response_a": [["old answer", "new answer"]],
                       "response_b": [["old answer", "other answer"]]})
    full = Formatter(tok, 128).format_text(*df.iloc[0])
    last = Formatter(tok, 128, max_turns=1)
    text = tok.decode(last.assemble(last.encode_rows(df), 0)[0].tolist())
    assert "first" in full and "old" in full
    assert "first" not in text and "old" not in text and "second" in text and "new" in text and "other" in text
    assert Formatter(tok, 128).signature() != last.signature()
