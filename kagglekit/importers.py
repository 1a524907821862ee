"""``kk data import``: public preference sets in the task's train format, deduplicated (README, "Data").

Layouts (JSON, JSON lines, optionally gzipped, or parquet): ``arena`` (lmsys/chatbot_arena_conversations: the A/B
order the voter saw is kept, both ties are ties), ``ultrafeedback`` (prompt/chosen/rejected message lists, equal
scores a tie), ``hh-rlhf`` (chosen/rejected ``Human:``/``Assistant:`` transcripts) and ``pairs`` (JSON lines of prompt/chosen/rejected: strings,
turn lists or messages). Chosen lands in A or B by a draw from ``seed``. Dropped, each counted under its reason:
records without a usable comparison (no response, prompts differing between the sides, an unknown winner,
identical chosen and rejected), repeats, and pairs that are a train or test row
(:func:`kagglekit.dedup.pair_key`). Rows sharing only a prompt with a train row are kept; :mod:`kagglekit.extra`
keeps them out of the fold that validates on it.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dedup import normalise
from .errors import KKError
from .task import LMSYS, get_task

FORMATS = ("arena", "ultrafeedback", "hh-rlhf", "pairs")
USER_ROLES = {"user", "human", "prompter"}
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatbot"}
ARENA_WINNERS = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (bothbad)": "tie"}


class Unusable(ValueError):
    """A record that holds no usable comparison: dropped and counted under its message."""


class Malformed(ValueError):
    """A record without the fields its format needs: dropped and counted, the first one quoted."""


@dataclass
class Pair:
    source_id: str
    prompt: list[str]
    a: list[str]
    b: list[str]
    winner: str  # a class name of the task: A, B or tie
    model_a: str = ""
    model_b: str = ""

    def __post_init__(self):  # ids and model names are written as they are: lone surrogates replaced, as in texts
        self.source_id, self.model_a, self.model_b = (_text(str(v)) for v in (self.source_id, self.model_a, self.model_b))


@dataclass
class ImportReport:
    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    first_malformed: str = ""
    shared_prompts: int = 0  # kept rows whose prompt is a train row's prompt
    out: str = ""

    def rows(self) -> list[list]:
        """(reason, rows) for the table: what was kept, then every reason for dropping."""
        return [["kept", self.kept], *([f"dropped: {reason}", n] for reason, n in self.dropped.most_common())]


# --- reading records ---------------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike):
    """Yield ``(line number, record)`` from a JSON array, JSON lines (``.gz`` too; a UTF-8 BOM is skipped) or a parquet
    file. A file that is not UTF-8 JSON (a bad byte, a damaged or cut-off .gz, nesting too deep to parse) is one
    error naming the file and, where it can, the line."""
    path = Path(path)
    if not path.is_file():
        raise KKError(f"{path} does not exist" if not path.exists() else f"{path} is a folder, expected a data file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise KKError(f"{path}: cannot be read as parquet ({str(e).splitlines()[0][:160]})") from None
        yield from enumerate(records, 1)
        return
    n = 0
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            if f.read(1 << 16).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):  # one JSON array
                f.seek(0)
                yield from enumerate(_loads(f.read(), path, 1), 1)
                return
            f.seek(0)
            for n, line in enumerate(f, 1):  # JSON lines
                if line.strip():
                    yield n, _loads(line, path, n)
    except (OSError, EOFError, zlib.error) as e:
        raise KKError(f"{path}: cannot be read{f' past line {n}' if n else ''} ({type(e).__name__}: {str(e)[:120]})") from None


def _loads(data: bytes, path: Path, n: int):
    """JSON text that starts at line ``n`` of ``path``."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        n += data.count(b"\n", 0, e.start)
        raise KKError(f"{path}: line {n} is not UTF-8 text (byte {data[e.start]:#04x})") from None
    except ValueError as e:
        raise KKError(f"{path}: line {n + getattr(e, 'lineno', 1) - 1} is not valid JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise KKError(f"{path}: line {n} or after nests JSON too deeply to read") from None


# --- messages, turns and the four layouts ---------------------------------------------------------------------------


_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def split_transcript(text: str) -> tuple[list[str], list[str]]:
    """(human turns, assistant turns) of equal length from an HH-RLHF transcript ("\\n\\nHuman: ..." /
    "\\n\\nAssistant: ..."); a missing answer is an empty turn."""
    parts = _TURN.split(text)  # [preamble, role, text, role, text, ...]
    return messages_to_turns([{"role": role, "content": turn.strip()} for role, turn in zip(parts[1::2], parts[2::2])])


def _text(x) -> str:
    from .data import clean_text

    if x is None:
        return ""
    if not isinstance(x, str):
        raise Malformed(f"a text is a {type(x).__name__}, not a string")
    return clean_text(x)[0]


def messages_to_turns(messages) -> tuple[list[str], list[str]]:
    """(user turns, assistant turns) of equal length from ``[{role, content}, ...]``: each user message opens a
    turn, assistant messages answer the open turn (several are joined); system messages are left out."""
    if not isinstance(messages, (list, tuple)):
        raise Malformed(f"a conversation is a {type(messages).__name__}, not a list of messages")
    prompts: list[str] = []
    answers: list[str] = []
    for m in messages:
        if not isinstance(m, dict) or "content" not in m or "role" not in m:
            raise Malformed("a message is not a {role, content} object")
        role, content = str(m["role"]).lower(), _text(m["content"])
        if role in USER_ROLES:
            prompts.append(content)
            answers.append("")
        elif role in ASSISTANT_ROLES:
            if not prompts:  # an answer before any question: pair it with an empty prompt
                prompts.append("")
                answers.append(content)
            else:
                answers[-1] = (answers[-1] + "\n\n" + content).strip() if answers[-1] else content
        elif role != "system":
            raise Malformed(f"unknown message role {m['role']!r}")
    return prompts, answers


def _turns(value, what: str) -> list[str]:
    """A string, or a list of strings, as turns."""
    if isinstance(value, str):
        return [_text(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) or t is None for t in value) and value:
        return [_text(t) for t in value]
    raise Malformed(f"{what} is neither a string nor a list of strings")


def _field(rec: dict, key: str):
    if not isinstance(rec, dict):
        raise Malformed(f"the record is a {type(rec).__name__}, not an object")
    if key not in rec:
        raise Malformed(f"no {key!r} field")
    return rec[key]


def _side(rec: dict, key: str, prompt_key: str | None) -> tuple[list[str], list[str]]:
    """(prompt turns, response turns) of one side of a chosen/rejected record."""
    value = _field(rec, key)
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        prompts, answers = messages_to_turns(value)
        if not any(prompts) and prompt_key and rec.get(prompt_key):  # messages without the user turn
            prompts = _turns(rec[prompt_key], prompt_key)
            if len(prompts) != len(answers):
                raise Unusable("turn counts differ between prompt and responses")
        return prompts, answers
    answers = _turns(value, key)
    prompts = _turns(_field(rec, prompt_key), prompt_key) if prompt_key else [""] * len(answers)
    if len(prompts) != len(answers):
        raise Unusable("turn counts differ between prompt and responses")
    return prompts, answers


def _arena(n: int, rec: dict) -> Pair:
    winner = ARENA_WINNERS.get(str(_field(rec, "winner")).strip())
    if winner is None:
        raise Unusable("unknown winner")
    p_a, a = messages_to_turns(_field(rec, "conversation_a"))
    p_b, b = messages_to_turns(_field(rec, "conversation_b"))
    if normalise(p_a) != normalise(p_b):
        raise Unusable("conversation_a and conversation_b have different prompts")
    return Pair(rec.get("question_id", n), p_a, a, b, winner, rec.get("model_a", ""), rec.get("model_b", ""))


def _chosen_rejected(n: int, rec: dict, fmt: str) -> Pair:
    if fmt == "hh-rlhf":  # two whole transcripts
        (p_c, chosen), (p_r, rejected) = (split_transcript(_text(_field(rec, k))) for k in ("chosen", "rejected"))
    else:
        (p_c, chosen), (p_r, rejected) = (_side(rec, k, "prompt") for k in ("chosen", "rejected"))
    if normalise(p_c) != normalise(p_r):
        raise Unusable("chosen and rejected have different prompts")
    if normalise(chosen) == normalise(rejected):
        raise Unusable("chosen and rejected are the same text")
    winner = "A"
    if fmt == "ultrafeedback" and rec.get("score_chosen") is not None and rec.get("score_chosen") == rec.get("score_rejected"):
        winner = "tie"  # UltraFeedback: equal ratings are no preference
    return Pair(rec.get("id", rec.get("prompt_id", n)), p_c, chosen, rejected, winner, "chosen", "rejected")


def read_pairs(fmt: str, src, report: ImportReport, limit: int | None = None):
    """Yield the source's comparisons as :class:`Pair` (chosen/rejected ones with the chosen as A); the unusable and
    malformed ones are counted in ``report``."""
    if fmt not in FORMATS:
        raise KKError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    for n, rec in read_records(src):
        if limit and report.records >= limit:
            return
        report.records += 1
        try:
            pair = _arena(n, rec) if fmt == "arena" else _chosen_rejected(n, rec, fmt)
        except Malformed as e:
            report.dropped[f"not a record of the {fmt} layout"] += 1
            report.first_malformed = report.first_malformed or f"record {n}: {e}"
            continue
        except Unusable as e:
            report.dropped[str(e)] += 1
            continue
        if not any(t.strip() for t in pair.a) or not any(t.strip() for t in pair.b):
            report.dropped["a response is empty"] += 1
            continue
        yield n, pair


# --- import: convert, deduplicate, write ------------------------------------------------------------------------------


def _known_keys(path, task) -> tuple[set, set]:
    """(pair keys, prompt keys) of a competition file (the task's train or test format)."""
    from .data import load_arena
    from .dedup import frame_keys

    df, report = load_arena(path, "test", bad_rows="repair", task=task)
    report.print_warnings()
    pairs, prompts = frame_keys(df)
    return set(pairs), set(prompts)


def import_frame(fmt: str, src, train=None, test=None, seed: int = 42, limit: int | None = None, task=LMSYS):
    """``src`` (layout ``fmt``) as a frame in ``task``'s train format, and what was kept and dropped."""
    import pandas as pd

    from .dedup import pair_key, prompt_key

    for what, path in (("--train", train), ("--test", test)):
        if path is not None and not Path(path).is_file():
            raise KKError(f"{what} {path} does not exist: give the competition's file to deduplicate against (or --no-dedup)")
    train_pairs, train_prompts = _known_keys(train, task) if train is not None else (set(), set())
    test_pairs, _ = _known_keys(test, task) if test is not None else (set(), set())
    report = ImportReport()
    rng = np.random.default_rng(seed)
    cls = {name: j for j, name in enumerate(task.class_names)}
    rows, seen = [], set()
    for n, pair in read_pairs(fmt, src, report, limit):
        if pair.winner not in cls:
            report.dropped[f"a {pair.winner} (the task has no such class)"] += 1
            continue
        key = pair_key(pair.prompt, pair.a, pair.b)
        known = ((train_pairs, "same prompt+responses as a train row"), (test_pairs, "same prompt+responses as a test row"),
                 (seen, "repeats an earlier row of the source"))
        reason = next((why for keys, why in known if key in keys), None)
        if reason:
            report.dropped[reason] += 1
            continue
        seen.add(key)
        a, b, winner, model_a, model_b = pair.a, pair.b, pair.winner, pair.model_a, pair.model_b
        if fmt != "arena" and rng.integers(2):  # the chosen response in A or B, drawn with the seed
            a, b, model_a, model_b = b, a, model_b, model_a
            winner = {"A": "B", "B": "A"}.get(winner, winner)
        report.shared_prompts += prompt_key(pair.prompt) in train_prompts
        label = {c: v[0] for c, v in task.label_cells([cls[winner]]).items()}
        p_col, a_col, b_col = task.text_columns
        rows.append({"id": f"{fmt}-{n}", "source_id": pair.source_id, "model_a": model_a, "model_b": model_b,
                     p_col: task.encode_cell(pair.prompt), a_col: task.encode_cell(a), b_col: task.encode_cell(b),
                     **{c: (int(v) if task.one_hot_labels else v) for c, v in label.items()}})
    report.kept = len(rows)
    if not rows:
        first = f" (first malformed: {report.first_malformed})" if report.first_malformed else ""
        reasons = ", ".join(f"{n} {r}" for r, n in report.dropped.most_common()) or "the source is empty"
        raise KKError(f"{src}: no usable {fmt} rows of {report.records} record(s): {reasons}{first}")
    return pd.DataFrame(rows), report


def import_data(fmt: str, src, out, train=None, test=None, seed: int = 42, limit: int | None = None,
                force: bool = False, task_name: str = "lmsys") -> ImportReport:
    """Convert ``src`` (layout ``fmt``) into ``out`` in the competition's train format; returns what was kept and dropped."""
    from .io import check_writable, protect_existing, write_table

    out = Path(out)
    if not out.parent.is_dir():
        raise KKError(f"--out {out}: the folder {out.parent} does not exist")
    protect_existing(out, force, "imported data", sources=[src, train, test])
    check_writable(out.parent, f"--out {out}")
    df, report = import_frame(fmt, src, train, test, seed, limit, get_task(task_name))
    write_table(out, df)
    report.out = str(out)
    return report


def preference_set(hh_path, arena_paths=(), seed: int = 0, limit: int | None = None, task=LMSYS):
    """The first ``limit`` HH-RLHF records (:func:`import_frame`) plus real arena train files of ``task``'s competition
    (CSV or parquet, raw cells kept) as one train frame, shuffled: the quality benchmark's set. In HH-RLHF the two
    transcripts share every turn but the last answer, so a model learns only if it sees the *end* of the responses
    (``model.truncation: left``)."""
    import pandas as pd

    from .data import read_table

    keep = (*task.train_columns, "model_a", "model_b", *([task.language_column] if task.language_column else []))
    frames = [import_frame("hh-rlhf", hh_path, seed=seed, limit=limit, task=task)[0]]
    frames += [(df := read_table(p, task.train_columns, "train"))[[c for c in df.columns if c in keep]] for p in arena_paths]
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
