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


# --- model.layout: rounds, model.instruction, model.chat_template (issue 20) -------------------------------------------

@pytest.fixture(scope="module")
def llama_tok(tiny_project):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_project / "llama")


def _rows():
    """Three rows: a 3-round conversation whose first answer is long, one round, and rounds of unequal answers."""
    long = " ".join(["river"] * 120)
    return pd.DataFrame({
        "prompt": [["first question", "second question", "third question"], ["only question"], ["q one", "q two"]],
        "response_a": [[long, "answer two", "answer three"], ["only answer " + long], ["short", "alpha alpha"]],
        "response_b": [["other one", "other two", "other three"], ["only other"], ["a much longer answer " * 5, "beta"]],
    })


def test_rounds_interleave_each_turn(llama_tok):
    fmt = Formatter(llama_tok, 512, layout="rounds")
    text = llama_tok.decode(fmt.assemble(fmt.encode_rows(_rows()), 0)[0].tolist())
    order = [text.index(s) for s in ("first question", "river", "other one", "second question", "answer two", "other two",
                                     "third question", "answer three", "other three")]
    assert order == sorted(order) and text.count("<PROMPT>") == 3 and text.count("<A>") == 3 and "<TURN>" not in text


def test_rounds_drop_whole_earliest_rounds_first(llama_tok):
    df = _rows().head(1)
    full = Formatter(llama_tok, 512, layout="rounds")
    enc = full.encode_rows(df)
    n_full = len(full.assemble(enc, 0)[0])
    # just too short for round 1 (its long answer): rounds 2 and 3 are kept whole, round 1 is gone entirely
    fmt = Formatter(llama_tok, n_full - 1, layout="rounds")
    ids, kept = fmt.assemble(fmt.encode_rows(df), 0)
    text = llama_tok.decode(ids.tolist())
    assert "second question" in text and "answer three" in text and "other two" in text
    assert "first question" not in text and "river" not in text and "other one" not in text  # never a question without its answers
    seqs, stats = fmt.sequences(fmt.encode_rows(df))
    assert stats.rounds_kept.tolist() == [2] and stats.rounds_total.tolist() == [3]
    summary = stats.summary()
    assert summary["rounds"]["share_rows_with_dropped_rounds"] == 1.0 and summary["rounds"]["retention"] == pytest.approx(2 / 3)
    assert summary["share_truncated"] == 1.0 and summary["retention"]["response_a"] < 0.1  # the long answer went
    # the blocks layout at the same length keeps part of every turn instead
    blocks = Formatter(llama_tok, n_full - 1)
    assert "first question" in llama_tok.decode(blocks.assemble(blocks.encode_rows(df), 0)[0].tolist())
    assert blocks.sequences(blocks.encode_rows(df))[1].rounds_kept is None


def test_rounds_cut_the_last_round_by_the_truncation_rules(llama_tok):
    df = _rows().iloc[[1]]  # one round whose answer A alone is over the budget
    for strategy in ("head_tail", "left", "right"):
        fmt = Formatter(llama_tok, 48, strategy, layout="rounds")
        enc = fmt.encode_rows(df)
        ids, kept = fmt.assemble(enc, 0)
        assert len(ids) <= 48 and kept[0] == enc.totals(0)[0]  # the question stays whole, the long answer is cut
        blocks = Formatter(llama_tok, 48, strategy)
        assert ids.tolist() == blocks.assemble(blocks.encode_rows(df), 0)[0].tolist()  # one round: the same rules exactly


@pytest.mark.parametrize("layout", ["blocks", "rounds"])
@pytest.mark.parametrize("length", [512, 60, 30])
def test_swap_is_exact_in_both_layouts(llama_tok, layout, length):
    """A pair formatted with A and B exchanged is, token for token, the swapped pair: what swap augmentation and
    swap TTA rely on, at every truncation."""
    df = _rows()
    swapped = df.rename(columns={"response_a": "response_b", "response_b": "response_a"})
    fmt = Formatter(llama_tok, length, layout=layout)
    seqs_ba, stats_ba = fmt.sequences(fmt.encode_rows(df), swap=True)
    seqs_sw, stats_sw = fmt.sequences(fmt.encode_rows(swapped), swap=False)
    assert [s.tolist() for s in seqs_ba] == [s.tolist() for s in seqs_sw]
    assert (stats_ba.kept == stats_sw.kept).all() and (stats_ba.total == stats_sw.total).all()
    seqs_ab, stats_ab = fmt.sequences(fmt.encode_rows(df))
    assert (stats_ab.kept[:, [0, 2, 1]] == stats_ba.kept).all() and max(len(s) for s in seqs_ab) <= length
    text = llama_tok.decode(seqs_ba[2].tolist())
    assert text.index("beta") < text.index("alpha")  # B's answer now sits where A's was


def test_instruction_and_chat_template(llama_tok, tmp_path):
    from transformers import AutoTokenizer

    df = _rows().head(1)
    plain = Formatter(llama_tok, 512, layout="rounds")
    judged = Formatter(llama_tok, 512, layout="rounds", instruction="which answer is better")
    text = llama_tok.decode(judged.assemble(judged.encode_rows(df), 0)[0].tolist())
    assert text.index("which answer is better") < text.index("<PROMPT>") and text.rstrip().endswith("<END>")
    assert len(judged.prefix) > len(plain.prefix) and judged.signature() != plain.signature()
    # a tokenizer with a chat template: the instruction and the pair are the user's message, the assistant's turn follows
    llama_tok.save_pretrained(tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(tmp_path / "chat")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}role {{ m.role }} says {{ m.content }}{{ eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %} role assistant says{% endif %}")
    chat = Formatter(tok, 512, layout="rounds", instruction="which answer is better", chat_template=True)
    ids = chat.assemble(chat.encode_rows(df), 0)[0]
    text = tok.decode(ids.tolist())
    assert text.index("role user says") < text.index("which answer is better") < text.index("<PROMPT>") < text.index("</s>")
    assert text.rstrip().endswith("role assistant says") and "<END>" not in text and ids[0] == tok.bos_token_id
    assert list(ids[-len(chat.suffix):]) == list(chat.suffix) and chat.signature() != judged.signature()
    short = Formatter(tok, 64, layout="rounds", instruction="which answer is better", chat_template=True)
    assert all(len(s) <= 64 for s in short.sequences(short.encode_rows(_rows()))[0])  # the template counts in the budget
    # no chat template (the tiny tokenizer, DeBERTa): chat_template=true changes nothing
    assert Formatter(llama_tok, 512, chat_template=True).signature() == Formatter(llama_tok, 512).signature()
