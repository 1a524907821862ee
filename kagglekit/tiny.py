"""A tiny, randomly initialised backbone built offline in seconds.

No weights can be downloaded in tests or CI, so this builds a small model of a
real architecture (DeBERTa-v2/v3 with relative attention, or Llama) and trains
a tokenizer on the given texts, saved with ``save_pretrained`` so that
``from_pretrained(path)`` loads it exactly like a hub model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import KKError
from .task import LMSYS, Task

ARCHS = ("deberta-v2", "llama", "qwen2", "mistral", "gemma2")
DECODERS = ("llama", "qwen2", "mistral", "gemma2")


def _corpus(train_csv: str | None, n_synthetic: int = 800) -> list[str]:
    import pandas as pd

    if train_csv and str(train_csv).lower().endswith((".parquet", ".pq")):
        from .data import read_raw

        df = read_raw(train_csv)
    elif train_csv:
        df = pd.read_csv(train_csv, dtype=str, keep_default_na=False)
    else:
        from .synthetic import make_synthetic

        df = make_synthetic(n_synthetic, seed=0)
    texts = []
    for col in ("prompt", "response_a", "response_b"):
        if col not in df.columns:
            raise KKError(f"{train_csv}: missing column {col}")
        for cell in df[col]:
            try:
                turns = json.loads(cell)
            except (TypeError, ValueError):  # a plain-text cell (WSDM), or a null one
                turns = [cell]
            texts.extend(t for t in (turns if isinstance(turns, list) else [turns]) if isinstance(t, str) and t)
    from .formatting import END_MARKER, HEADERS, TURN_SEP

    # The formatting markers are in the corpus so that they become whole tokens.
    texts.extend([" ".join(HEADERS) + TURN_SEP + END_MARKER] * 50)
    return texts


def unigram_vocab(texts: list[str], vocab_size: int, specials: list[str]) -> list[tuple[str, float]]:
    """A Unigram vocabulary built deterministically: special tokens, the most frequent words
    (ties broken alphabetically) as whole pieces, and every character as a fallback piece.

    Trainers in the tokenizers library break ties in an order that changes from process to
    process, so a tokenizer trained twice on the same texts can differ; this one cannot.
    """
    import math
    from collections import Counter

    words: Counter = Counter()
    chars: set = set()
    for t in texts:
        for w in t.split():
            words["\u2581" + w] += 1
            chars.update(w)
    char_pieces = sorted(chars)
    n_words = max(0, vocab_size - len(specials) - 1 - 2 * len(char_pieces))
    top = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]
    total = sum(words.values()) or 1
    vocab = [(tok, 0.0) for tok in specials] + [("\u2581", -12.0)]
    vocab += [(w, math.log(c / total)) for w, c in top]
    # Characters score far below any word, so known words stay whole and the rest is spelled out.
    vocab += [("\u2581" + c, -18.0) for c in char_pieces] + [(c, -19.0) for c in char_pieces]
    first: dict[str, float] = {}
    for piece, score in vocab:
        first.setdefault(piece, score)
    return list(first.items())


def build_tiny_model(out_dir: str | os.PathLike, arch: str = "deberta-v2", train_csv: str | None = None, vocab_size: int = 1000,
                     hidden: int = 64, layers: int = 2, heads: int = 2, max_positions: int = 1024, seed: int = 0,
                     task: Task = LMSYS, force: bool = False) -> Path:
    """Write a tiny ``arch`` model + tokenizer to ``out_dir``, its head sized for ``task``'s classes;
    returns the path. ``train_csv``: a train file (CSV or parquet) whose texts the tokenizer learns.

    A non-empty ``out_dir`` is refused (a mistyped path must not overwrite a real backbone); ``force`` replaces
    only an earlier tiny model. The folder is written whole, then swapped in."""

    if arch not in ARCHS:
        raise KKError(f"--arch must be one of {', '.join(ARCHS)} (got {arch!r})")
    import torch

    from .io import atomic_dir, claim_output_dir, mark_output_dir
    from .modeling import quiet_libraries

    quiet_libraries()
    out = Path(out_dir)
    claim_output_dir(out, force, "tiny-model", sources=[train_csv])
    texts = _corpus(train_csv)
    torch.manual_seed(seed)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden * 2,
                 max_position_embeddings=max_positions, num_labels=task.n_classes)
    if arch == "deberta-v2":
        from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Tokenizer

        tok = DebertaV2Tokenizer(vocab=unigram_vocab(texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        cfg = DebertaV2Config(
            vocab_size=len(tok),
            **sizes,
            # As in DeBERTa-v3: relative positions with log buckets, no absolute positions.
            relative_attention=True,
            position_buckets=256,
            max_relative_positions=-1,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            pooler_hidden_size=hidden,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
        model = DebertaV2ForSequenceClassification(cfg)
    else:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = unigram_vocab(texts, vocab_size, ["<unk>", "<s>", "</s>"])
        core = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
        core.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC()])
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        # Like Llama's: a BOS token in front, no end token and no pad token (kagglekit sets one).
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        tok.pad_token = tok.eos_token
        common = dict(
            vocab_size=len(tok),
            **sizes,
            num_key_value_heads=heads,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model = _decoder(arch, common, hidden // heads)
    from .io import normal_mode, safetensors_errors

    # Written beside ``out`` and swapped in when complete (files in the normal mode): a full disk leaves no folder
    # holding only config.json, and a --force that fails keeps the earlier tiny model.
    with atomic_dir(out) as tmp:
        with safetensors_errors(out):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                normal_mode(f)
        mark_output_dir(tmp, "tiny-model")
    return out


def _decoder(arch: str, common: dict, head_dim: int):
    """A decoder of the family ``arch`` with its own config class (each family's quirks included:
    Gemma-2's soft-capping and sliding windows, Qwen2's QKV biases, Mistral's sliding window)."""
    import transformers as T

    if arch == "llama":
        return T.LlamaForSequenceClassification(T.LlamaConfig(**common))
    if arch == "qwen2":
        return T.Qwen2ForSequenceClassification(T.Qwen2Config(**common))
    if arch == "mistral":
        return T.MistralForSequenceClassification(T.MistralConfig(**common, head_dim=head_dim, sliding_window=256))
    if arch == "gemma2":
        # head_dim defaults to 256 in Gemma-2; at toy size it must follow hidden / heads.
        return T.Gemma2ForSequenceClassification(T.Gemma2Config(**common, head_dim=head_dim, sliding_window=256))
    raise KKError(f"unknown decoder {arch}")
