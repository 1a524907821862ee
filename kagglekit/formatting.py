"""Turning (prompt, response A, response B) into one token sequence: the one path of training, inference, the
benchmarks and the kernel (README, "One formatting path" and "Per-round layout"). Field headers are always kept; a
neutral ``<TURN>`` joins turns so exchanging A and B reuses the same field tokens (swap augmentation and TTA
tokenize once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np

from .errors import KKError

FIELDS = ("prompt", "response_a", "response_b")
HEADERS = ("<PROMPT>", "<A>", "<B>")
TURN_SEP = " <TURN> "
# Decoder tokenizers add no end token; the classifier pools the last token, so the
# sequence ends with a fixed marker rather than with whatever text B ends on.
END_MARKER = " <END>"
# Characters kept per token of the text budget when a field is cut by characters before tokenizing. Real
# tokens average about 4 characters of English and rarely exceed 16, so the kept part still holds a budget
# of tokens; 16 x a 1,280-token budget is ~20,000 characters per end of a field.
CHARS_PER_TOKEN = 16


def allocate(lengths: list[int], shares: list[float], budget: int) -> list[int]:
    """Water-filling: split ``budget`` tokens between fields of these lengths.

    A field never gets more than it needs; what it leaves flows to the others in
    proportion to their shares. The result sums to ``min(budget, sum(lengths))``.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    alloc = [0] * len(lengths)
    active = [i for i, n in enumerate(lengths) if n > 0]
    remaining = budget
    while active:
        total = sum(shares[i] for i in active)
        quota = {i: remaining * shares[i] / total for i in active}
        satisfied = [i for i in active if lengths[i] <= quota[i]]
        if satisfied:
            for i in satisfied:
                alloc[i] = lengths[i]
                remaining -= lengths[i]
                active.remove(i)
            continue
        floors = {i: int(math.floor(quota[i])) for i in active}
        for i in active:
            alloc[i] = floors[i]
        left = remaining - sum(floors.values())
        # Hand the rounding remainder to the largest fractional parts (ties: field order).
        for i in sorted(active, key=lambda j: (-(quota[j] - floors[j]), j))[:left]:
            alloc[i] += 1
        break
    return alloc


def cut(tokens, keep: int, strategy: str):
    """Keep ``keep`` tokens of ``tokens`` (a list or a 1-D array) by the truncation strategy."""
    n = len(tokens)
    if keep >= n:
        return tokens
    if keep <= 0:
        return tokens[:0]
    if strategy == "right":
        return tokens[:keep]
    if strategy == "left":
        return tokens[n - keep :]
    head = (keep + 1) // 2
    tail = tokens[n - (keep - head) :]
    return tokens[:head] + tail if isinstance(tokens, list) else np.concatenate([tokens[:head], tail])


@dataclass
class EncodedRows:
    """Field tokens of a set of rows (int32 arrays), ready to assemble in either A/B order."""

    prompt: list[np.ndarray]
    response_a: list[np.ndarray]
    response_b: list[np.ndarray]
    # (rows, 3): how many times longer each field's text was than the part tokenized (1 = all of it;
    # above 1 = cut by characters first, see CHARS_PER_TOKEN). None: no field was cut.
    char_ratio: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt)

    def totals(self, i: int) -> tuple[int, int, int]:
        """Tokens of row ``i``'s prompt, response A and response B before truncation."""
        return len(self.prompt[i]), len(self.response_a[i]), len(self.response_b[i])


@dataclass
class EncodedRounds:
    """``model.layout: rounds``: per row, the (prompt, A, B) token arrays of each turn."""

    rounds: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
    char_ratio: np.ndarray | None = None  # as EncodedRows.char_ratio, over all turns of a field

    def __len__(self) -> int:
        return len(self.rounds)

    def totals(self, i: int) -> tuple[int, int, int]:
        return tuple(sum(len(r[j]) for r in self.rounds[i]) for j in range(3))


class Formatter:
    """Builds model inputs for one tokenizer and one ``ModelConfig``."""

    def __init__(self, tokenizer, max_length: int, truncation: str = "head_tail", shares=(0.2, 0.4, 0.4), max_turns: int = 0,
                 layout: str = "blocks", instruction: str | None = None, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_turns = int(max_turns)
        self.max_length = int(max_length)
        self.truncation = truncation
        self.shares = [float(s) for s in shares]
        self.layout = layout
        self.instruction = instruction or None
        self.chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        if self.chat_template:
            prefix, suffix = _chat_template_parts(tokenizer, self.instruction)
        else:
            prefix, suffix = _special_template(tokenizer)
            if self.instruction:
                # After the tokenizer's own start token(s): the model reads the instruction first.
                prefix = list(prefix) + self._tok(self.instruction)
        self.prefix, self.suffix = _ids(prefix), _ids(suffix)
        self.headers = [_ids(self._tok(h)) for h in HEADERS]
        self.end = _ids(self._tok(END_MARKER) if not suffix else [])
        overhead = len(self.prefix) + len(self.suffix) + sum(map(len, self.headers)) + len(self.end)
        self.budget = self.max_length - overhead
        if self.budget < 3:
            raise KKError(f"model.max_length={self.max_length} leaves no room for text ({overhead} tokens go to markers)")

    @classmethod
    def from_config(cls, tokenizer, model_cfg) -> Formatter:
        b = model_cfg.budget
        return cls(tokenizer, model_cfg.max_length, model_cfg.truncation, (b.prompt, b.response_a, b.response_b),
                   getattr(model_cfg, "max_turns", 0), getattr(model_cfg, "layout", "blocks"),
                   getattr(model_cfg, "instruction", None), getattr(model_cfg, "chat_template", False))

    def signature(self) -> str:
        """Identifies what this formatter produces: the tokenizer's full definition and the settings.
        Two folds with equal signatures turn the same rows into the same token ids (computed once: it hashes the
        tokenizer's whole definition)."""
        import hashlib

        if "_signature" not in self.__dict__:
            tok = self.tokenizer
            core = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(sorted(tok.get_vocab().items()))
            h = hashlib.sha256(core.encode())
            h.update(repr((type(tok).__name__, self.max_length, self.truncation, self.shares, self.max_turns)).encode())
            if self.layout != "blocks" or self.instruction or self.chat_template:
                h.update(repr((self.layout, self.instruction, self.prefix.tolist(), self.suffix.tolist())).encode())
            self._signature = h.hexdigest()
        return self._signature

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cut_chars(self, text: str) -> str:
        """``text`` itself, or the characters the token cut keeps when it is over the limit: its start
        (``right``), its end (``left``) or both ends (``head_tail``; the seam is in the dropped middle)."""
        n = CHARS_PER_TOKEN * self.budget  # per end: a field may get the whole budget when the others are short
        if self.truncation == "right":
            return text[:n] if len(text) > n else text
        if self.truncation == "left":
            return text[-n:] if len(text) > n else text
        return text[:n] + text[-n:] if len(text) > 2 * n else text

    def encode_rows(self, df, chunk: int = 2048) -> EncodedRows:
        """Tokenize the three text fields of every row (turn lists joined by <TURN>), in chunks, each kept as int32
        arrays: 57k real rows as Python int lists would take several GB; as arrays a few hundred MB."""
        if self.layout == "rounds":
            return self.encode_rounds(df, chunk)
        out = {}
        ratio = np.ones((len(df), len(FIELDS)))
        for j, field in enumerate(FIELDS):
            # max_turns keeps the last N turns of a conversation (they decide; earlier turns are often
            # identical between A and B): the same N for the prompt and both responses.
            texts = [TURN_SEP.join(turns[-self.max_turns :] if self.max_turns else turns) for turns in df[field]]
            for i, text in enumerate(texts):
                short = self.cut_chars(text)
                if len(short) < len(text):
                    ratio[i, j] = len(text) / max(1, len(short))
                    texts[i] = short
            out[field] = [_ids(x) for start in range(0, len(texts), chunk)
                          for x in self.tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]]
        return EncodedRows(**out, char_ratio=ratio if (ratio > 1).any() else None)

    def encode_rounds(self, df, chunk: int = 2048) -> EncodedRounds:
        """Tokenize every turn of every row on its own (``model.layout: rounds``); ``max_turns`` keeps the last N
        rounds. A row whose fields have fewer turns than the others gets empty turns there."""
        per_field = []
        ratio = np.ones((len(df), len(FIELDS)))
        for j, field in enumerate(FIELDS):
            turns = [list(t[-self.max_turns :] if self.max_turns else t) for t in df[field]]
            for i, row in enumerate(turns):
                short = [self.cut_chars(text) for text in row]  # bounded work, as in encode_rows
                chars, kept_chars = sum(map(len, row)), sum(map(len, short))
                if kept_chars < chars:
                    ratio[i, j] = chars / max(1, kept_chars)
                    turns[i] = short
            flat = [text for row in turns for text in row]
            ids = [_ids(x) for start in range(0, len(flat), chunk)
                   for x in self.tokenizer(flat[start : start + chunk], add_special_tokens=False)["input_ids"]]
            ends = np.cumsum([0, *map(len, turns)])
            per_field.append([ids[a:b] for a, b in zip(ends[:-1], ends[1:])])
        empty = _ids([])
        rounds = [list(zip_longest(*fields, fillvalue=empty)) or [(empty, empty, empty)] for fields in zip(*per_field)]
        return EncodedRounds(rounds, char_ratio=ratio if (ratio > 1).any() else None)

    def assemble(self, enc, i: int, swap: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Input ids of row ``i`` (A and B exchanged when ``swap``) and tokens kept per field."""
        return self._assemble_row(enc, i, swap)[:2]

    def _assemble_row(self, enc, i: int, swap: bool):
        """(input ids, tokens kept per field, rounds kept or None) of row ``i`` in either layout: the blocks layout
        is one round."""
        if isinstance(enc, EncodedRounds):
            chosen = self._choose_rounds(enc.rounds[i], swap)
        else:
            first, second = (enc.response_b[i], enc.response_a[i]) if swap else (enc.response_a[i], enc.response_b[i])
            fields = (enc.prompt[i], first, second)
            chosen = [(fields, allocate([len(f) for f in fields], self.shares, self.budget))]
        parts, kept = [self.prefix], [0, 0, 0]
        for fields, keep in chosen:
            for j, (header, tokens, k) in enumerate(zip(self.headers, fields, keep)):
                parts += [header, cut(tokens, k, self.truncation)]
                kept[j] += k
        parts += [self.end, self.suffix]
        return np.concatenate(parts), tuple(kept), len(chosen) if isinstance(enc, EncodedRounds) else None

    def _choose_rounds(self, rounds: list, swap: bool) -> list:
        """``model.layout: rounds``: (fields, tokens kept) of the last round always, then of earlier rounds back to front
        while each fits whole; the first that does not fit is dropped with all before it (a question never loses its
        answers). The last round alone over the budget is cut like a row of the blocks layout. In sequence order."""
        headers = sum(len(h) for h in self.headers)
        room = self.budget + headers  # what the rounds may take, their headers included
        chosen = []
        for p, a, b in reversed(rounds):
            fields = (p, b, a) if swap else (p, a, b)
            lengths = [len(f) for f in fields]
            if not chosen:
                keep = allocate(lengths, self.shares, self.budget)
            elif headers + sum(lengths) <= room:
                keep = lengths
            else:
                break
            chosen.append((fields, keep))
            room -= headers + sum(keep)
        return chosen[::-1]

    def sequences(self, enc, swap: bool = False) -> tuple[list[np.ndarray], TruncationStats]:
        rows = [self._assemble_row(enc, i, swap) for i in range(len(enc))]
        seqs, kept, rounds = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        totals = np.array([enc.totals(i) for i in range(len(enc))], dtype=np.int64).reshape(-1, 3)
        char_cut = None
        if enc.char_ratio is not None:
            # A field cut by characters: its total is estimated from the part tokenized.
            totals = np.maximum(totals, np.rint(totals * enc.char_ratio).astype(np.int64))
            char_cut = (enc.char_ratio > 1).any(axis=1)
        if swap:
            totals = totals[:, [0, 2, 1]]
        stats = TruncationStats(np.array(kept, dtype=np.int64).reshape(-1, 3), totals, char_cut)
        if isinstance(enc, EncodedRounds):
            stats.rounds_kept = np.array(rounds, dtype=np.int64)
            stats.rounds_total = np.array([len(r) for r in enc.rounds], dtype=np.int64)
        return seqs, stats

    def segments(self, stats: TruncationStats) -> list[np.ndarray]:
        """Per sequence (in ``stats``' order): 1 on the first response's tokens, 2 on the second's, 0
        elsewhere (special tokens, headers, the prompt). What ``model.pooling: pair`` reads."""
        if self.layout != "blocks":
            raise KKError("model.pooling=pair reads one block per response: use model.layout=blocks with it")
        hp, ha, hb = (len(h) for h in self.headers)
        out = []
        for kp, k1, k2 in stats.kept:
            start_a = len(self.prefix) + hp + int(kp) + ha
            start_b = start_a + int(k1) + hb
            seg = np.zeros(start_b + int(k2) + len(self.end) + len(self.suffix), dtype=np.int8)
            seg[start_a : start_a + int(k1)] = 1
            seg[start_b : start_b + int(k2)] = 2
            out.append(seg)
        return out

    def format_text(self, prompt, a, b) -> str:
        """The decoded sequence of one pair, to see what the model sees."""
        import pandas as pd

        df = pd.DataFrame({"prompt": [as_turns(prompt)], "response_a": [as_turns(a)], "response_b": [as_turns(b)]})
        ids, _ = self.assemble(self.encode_rows(df), 0)
        return self.tokenizer.decode(ids.tolist())


@dataclass
class TruncationStats:
    """Per row and field (prompt, first response, second response): tokens kept and total; per row,
    whether a field was so long that it was cut by characters before tokenizing (its total is estimated);
    with ``model.layout: rounds`` also the rounds kept and the rounds of each row."""

    kept: np.ndarray
    total: np.ndarray
    char_cut: np.ndarray | None = None
    rounds_kept: np.ndarray | None = None
    rounds_total: np.ndarray | None = None

    def summary(self) -> dict:
        if len(self.kept) == 0:
            return {"rows": 0, "share_truncated": 0.0, "retention": {f: 1.0 for f in FIELDS}, "rows_cut_by_characters": 0}
        ratio = np.where(self.total > 0, self.kept / np.maximum(self.total, 1), 1.0)
        out = {
            "rows": int(len(self.kept)),
            "share_truncated": float((self.kept < self.total).any(axis=1).mean()),
            "retention": {f: float(ratio[:, j].mean()) for j, f in enumerate(FIELDS)},
            "mean_tokens": {f: float(self.total[:, j].mean()) for j, f in enumerate(FIELDS)},
            "rows_cut_by_characters": int(self.char_cut.sum()) if self.char_cut is not None else 0,
        }
        if self.rounds_kept is not None and len(self.rounds_kept):
            out["rounds"] = {"share_rows_with_dropped_rounds": float((self.rounds_kept < self.rounds_total).mean()),
                             "retention": float((self.rounds_kept / np.maximum(self.rounds_total, 1)).mean()),
                             "mean_rounds": float(self.rounds_total.mean())}
        return out


def _ids(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


def as_turns(x) -> list[str]:
    if x is None:
        return [""]
    if isinstance(x, str):
        return [x]
    return ["" if t is None else str(t) for t in x]


CHAT_MARK = "KAGGLEKITPAIRMARK"  # where the pair goes in the rendered chat template


def _chat_template_parts(tokenizer, instruction: str | None) -> tuple[list[int], list[int]]:
    """Token ids before and after the pair when the instruction and the pair are one user message of the
    tokenizer's chat template, with the assistant's turn opened after it (``add_generation_prompt``): the
    classifier's last token is then the one where the instruct model would start its verdict."""
    content = f"{instruction}\n\n{CHAT_MARK}" if instruction else CHAT_MARK
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    before, found, after = str(text).partition(CHAT_MARK)
    if not found:
        raise KKError("model.chat_template: the tokenizer's chat template does not show the user's message; "
                      "set model.chat_template=false")
    tok = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []  # noqa: E731
    return tok(before), tok(after)


def _special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence."""
    probe = "kagglekit"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []
