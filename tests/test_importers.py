"""`kk data import`: each public layout (fixtures written here from the datasets' documented schemas) becomes
train.csv rows; duplicates of train/test rows and of earlier source rows are dropped and tabled by reason."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.data import load_train
from kagglekit.errors import KKError
from kagglekit.importers import import_data


def _msgs(*turns):
    """[{role, content}] from (user, assistant) pairs."""
    return [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]


def _competition(tmp_path):
    """A two-row train.csv and a one-row test.csv to deduplicate against."""
    train = pd.DataFrame({
        "id": ["101", "102"], "model_a": ["x", "x"], "model_b": ["y", "y"],
        "prompt": [json.dumps(["What is the capital of France?"]), json.dumps(["Name a prime."])],
        "response_a": [json.dumps(["Paris."]), json.dumps(["7"])], "response_b": [json.dumps(["Lyon."]), json.dumps(["9"])],
        "winner_model_a": [1, 1], "winner_model_b": [0, 0], "winner_tie": [0, 0]})
    train.to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"id": ["201"], "prompt": [json.dumps(["Say hi"])], "response_a": [json.dumps(["hi"])],
                  "response_b": [json.dumps(["hello"])]}).to_csv(tmp_path / "test.csv", index=False)
    return tmp_path / "train.csv", tmp_path / "test.csv"


def _arena_rows():
    """lmsys/chatbot_arena_conversations records (question_id, model_a/b, winner, judge, conversation_a/b, turn, language)."""
    def rec(qid, winner, turns_a, turns_b, **kw):
        return {"question_id": qid, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner, "judge": "arena_user_1",
                "conversation_a": _msgs(*turns_a), "conversation_b": _msgs(*turns_b), "turn": len(turns_a),
                "anony": True, "language": "English", "tstamp": 1682351591.1322, **kw}

    return [
        rec("q1", "model_a", [("Tell a joke", "A pun.")], [("Tell a joke", "No.")]),
        rec("q2", "model_b", [("Hi", "Hello"), ("How are you?", "Fine")], [("Hi", "Hey"), ("How are you?", "Great!")]),
        rec("q3", "tie", [("2+2?", "4")], [("2+2?", "four")]),
        rec("q4", "tie (bothbad)", [("Capital of Peru?", "Quito")], [("Capital of Peru?", "Bogota")]),
        # the competition's train row 101 with A and B exchanged, re-spaced and upper-cased: a duplicate
        rec("q5", "model_b", [("what is the   capital of FRANCE?", "Lyon.")], [("What is the capital of France?", " PARIS. ")]),
        # the test row
        rec("q6", "model_a", [("Say hi", "hello")], [("Say hi", "hi")]),
        rec("q7", "model_a", [("Tell a joke", "A pun.")], [("Tell a joke", "No.")]),  # repeats q1
        rec("q8", "model_a", [("Question one", "x")], [("Another question", "y")]),  # different prompts
        rec("q9", "model_a", [("Empty?", "")], [("Empty?", "yes")]),  # no response
        rec("q10", "draw", [("A?", "a")], [("A?", "b")]),  # unknown winner
        {"question_id": "q11", "winner": "model_a"},  # not an arena record
    ]


@pytest.mark.parametrize("layout", ["json", "jsonl", "parquet"])
def test_arena_conversations_import(tmp_path, layout):
    train, test = _competition(tmp_path)
    src = tmp_path / f"arena.{layout}"
    rows = _arena_rows()
    if layout == "json":
        src.write_text(json.dumps(rows))
    elif layout == "jsonl":
        src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows[:-1]), src)  # a parquet file has one schema: no malformed record
    report = import_data("arena", src, tmp_path / "extra.csv", train=train, test=test)
    df, _ = load_train(tmp_path / "extra.csv")
    assert list(df["source_id"]) == ["q1", "q2", "q3", "q4"]
    assert df["label"].tolist() == [0, 1, 2, 2]  # model_a, model_b, tie, tie (bothbad); A/B as the voter saw them
    assert df["prompt"][1] == ["Hi", "How are you?"] and df["response_b"][1] == ["Hey", "Great!"]
    assert df["id"].is_unique and df["id"].str.startswith("arena-").all()
    assert report.kept == 4 and report.records == len(rows) - (layout == "parquet")
    assert report.dropped == {"same prompt+responses as a train row": 1, "same prompt+responses as a test row": 1,
                              "repeats an earlier row of the source": 1, "conversation_a and conversation_b have different prompts": 1,
                              "a response is empty": 1, "unknown winner": 1, **({"not a record of the arena layout": 1} if layout != "parquet" else {})}


def _ultrafeedback_rows():
    """HuggingFaceH4/ultrafeedback_binarized records: prompt, prompt_id, chosen/rejected/messages lists, scores."""
    def rec(pid, prompt, good, bad, sc=8.0, sr=4.0):
        return {"prompt": prompt, "prompt_id": pid, "chosen": _msgs((prompt, good)), "rejected": _msgs((prompt, bad)),
                "messages": _msgs((prompt, good)), "score_chosen": sc, "score_rejected": sr}

    return [rec(f"p{i}", f"Explain topic {i}", f"A clear explanation {i}", f"meh {i}") for i in range(20)] + [
        rec("tie", "Pick a colour", "Blue", "Red", 5.0, 5.0),
        rec("same", "Echo", "same text", "same  TEXT"),
    ]


def test_ultrafeedback_import_draws_the_order_with_the_seed(tmp_path):
    src = tmp_path / "uf.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in _ultrafeedback_rows())
    report = import_data("ultrafeedback", src, tmp_path / "a.csv", seed=1)
    assert report.kept == 21 and report.dropped == {"chosen and rejected are the same text": 1}
    df, _ = load_train(tmp_path / "a.csv")
    chosen_in_a = df["response_a"].map(lambda t: t[0].startswith("A clear"))
    main = df[df["source_id"].str.startswith("p")]
    assert ((main["label"] == 0) == chosen_in_a[main.index]).all()  # the label follows the chosen response
    assert 3 <= int(chosen_in_a[main.index].sum()) <= 17  # both orders occur
    assert df.loc[df["source_id"] == "tie", "label"].item() == 2  # equal scores: a tie
    import_data("ultrafeedback", src, tmp_path / "b.csv", seed=1)
    import_data("ultrafeedback", src, tmp_path / "c.csv", seed=2)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()  # the seed reproduces the file
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_hh_rlhf_import_reuses_the_transcript_reader(tmp_path):
    train, _ = _competition(tmp_path)
    src = tmp_path / "hh.jsonl"
    recs = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Good answer {i}.",
             "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Bad answer {i}."} for i in range(6)]
    recs.append({"chosen": "\n\nHuman: Name a prime.\n\nAssistant: 7", "rejected": "\n\nHuman: Name a prime.\n\nAssistant: 9"})
    recs.append({"chosen": "\n\nHuman: A\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "\n\nHuman: A\n\nAssistant: e"})
    src.write_text("\n".join(json.dumps(r) for r in recs))
    report = import_data("hh-rlhf", src, tmp_path / "hh.csv", train=train)
    assert report.kept == 6 and report.records == 8
    assert report.dropped == {"same prompt+responses as a train row": 1, "chosen and rejected have different prompts": 1}
    df, _ = load_train(tmp_path / "hh.csv")
    good_in_a = df["response_a"].map(lambda t: t[0].startswith("Good"))
    assert ((df["label"] == 0) == good_in_a).all() and df["prompt"][0] == ["Question 0?"]


def test_generic_pairs_accept_strings_turn_lists_and_messages(tmp_path):
    train, test = _competition(tmp_path)
    src = tmp_path / "pairs.jsonl"
    recs = [
        {"id": "s1", "prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "Paint."},
        {"id": "s2", "prompt": ["Hi", "And then?"], "chosen": ["Hello", "More"], "rejected": ["Yo", "Less"]},
        {"id": "s3", "chosen": _msgs(("Q", "good")), "rejected": _msgs(("Q", "bad"))},
        {"id": "s4", "prompt": ["one", "two"], "chosen": "only one turn", "rejected": "x"},  # turn counts differ
        {"id": "s5", "prompt": "p", "chosen": 3, "rejected": "x"},  # malformed
    ]
    src.write_text("\n".join(json.dumps(r) for r in recs))
    r = run_cli("data", "import", "pairs", src, "--out", tmp_path / "p.csv", "--train", train, "--test", test)
    assert r.exit_code == 0, r.output
    assert "first malformed record: record 5: chosen is neither a string nor a list of strings" in r.output
    table = [line for line in r.output.splitlines() if "│" in line]
    assert any("kept" in line and "3" in line for line in table), r.output
    assert any("turn counts differ" in line and "1" in line for line in table), r.output
    df, _ = load_train(tmp_path / "p.csv")
    assert df["source_id"].tolist() == ["s1", "s2", "s3"]
    assert df["prompt"][1] == ["Hi", "And then?"] and df["prompt"][2] == ["Q"]
    assert sorted(df["response_a"][2] + df["response_b"][2]) == ["bad", "good"]


def test_import_errors_are_one_line(tmp_path):
    train, test = _competition(tmp_path)
    src = tmp_path / "uf.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _ultrafeedback_rows()))
    r = run_cli("data", "import", "arena", src, "--out", tmp_path / "x.csv", "--train", train, "--test", test)
    assert r.exit_code == 1 and "no usable arena rows of 22 record(s): 22 not a record of the arena layout" in r.output
    assert "first malformed: record 1: no 'winner' field" in r.output and "Traceback" not in r.output
    r = run_cli("data", "import", "arena", src, "--out", tmp_path / "x.csv", "--train", tmp_path / "nope.csv")
    assert r.exit_code == 1 and "--train" in r.output and "nope.csv does not exist" in r.output
    r = run_cli("data", "import", "csv", src, "--out", tmp_path / "x.csv", "--no-dedup")
    assert r.exit_code == 1 and "unknown format 'csv'" in r.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{not json\n')
    with pytest.raises(KKError, match=r"bad.jsonl: line 2 is not valid JSON"):
        import_data("pairs", tmp_path / "bad.jsonl", tmp_path / "x.csv")
    import_data("ultrafeedback", src, tmp_path / "x.csv")
    r = run_cli("data", "import", "ultrafeedback", src, "--out", tmp_path / "x.csv", "--no-dedup")
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
