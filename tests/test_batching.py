"""Batching: padding efficiency that holds at every data size, token-budget batches, and padding-free
(packed) training for decoders whose logits match the padded path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from kagglekit.batching import (
    budget_from_probe,
    length_sorted_batches,
    padding_efficiency,
    plan_batches,
)


def lognormal_lengths(n, seed=0, cap=1280):
    """The shape of real arena rows in tokens (median ~620, long tail), cut at max_length."""
    return np.clip(np.random.default_rng(seed).lognormal(np.log(620), 0.85, n), 24, cap).astype(int)


def fixed_chunk_plan(lengths, batch_size, chunk):
    """The old planner: sort fixed chunks of `chunk` rows (what padding efficiency is compared against)."""
    perm = np.random.default_rng(0).permutation(len(lengths))
    out = []
    for s in range(0, len(perm), chunk):
        part = sorted(perm[s:s + chunk].tolist(), key=lambda i: -lengths[i])
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return out


@pytest.mark.parametrize("n", [2_000, 20_000])
def test_padding_efficiency_reaches_target_where_a_fixed_chunk_does_not(n):
    lengths = lognormal_lengths(n)
    units = [[i] for i in range(n)]
    plan = plan_batches(lengths, units, 8, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(n))
    assert all(len(b) == 8 for b in plan[:-1]) or sum(len(b) != 8 for b in plan) <= 1
    assert padding_efficiency(lengths, plan) >= 0.98
    assert padding_efficiency(lengths, fixed_chunk_plan(lengths, 8, 8 * 32)) < 0.98


def test_plans_still_shuffle_between_epochs():
    lengths = lognormal_lengths(4_000)
    units = [[i] for i in range(4_000)]
    e0, e1 = (plan_batches(lengths, units, 8, seed=1, epoch=e) for e in (0, 1))
    assert e0 == plan_batches(lengths, units, 8, seed=1, epoch=0)  # reproducible from (seed, epoch)
    same = {tuple(sorted(b)) for b in e0} & {tuple(sorted(b)) for b in e1}
    assert len(same) < 0.1 * len(e0)  # which rows share a batch changes
    # The batch order is shuffled: lengths are not presented longest first.
    widths = [max(lengths[i] for i in b) for b in e0]
    assert widths != sorted(widths, reverse=True)


def test_token_budget_batches_respect_the_budget():
    lengths = lognormal_lengths(3_000)
    units = [[i] for i in range(3_000)]
    plan = plan_batches(lengths, units, 8, seed=0, epoch=0, max_tokens=4096)
    assert sorted(i for b in plan for i in b) == list(range(3_000))
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in plan)
    sizes = [len(b) for b in plan]
    assert max(sizes) > 8 > min(sizes)  # short rows travel in bigger batches, long ones in smaller
    # A pair of both A/B orders stays together under a budget too.
    pairs = [[i, i + 1500] for i in range(1500)]
    for b in plan_batches(lengths, pairs, 8, seed=0, epoch=0, max_tokens=4096):
        assert all((i + 1500 if i < 1500 else i - 1500) in b for i in b)
    # Inference: longest first, within the budget; a row longer than the budget travels alone.
    inf = length_sorted_batches([5000, 30, 40, 1000, 900], 2, max_tokens=2048)
    assert inf == [[0], [3, 4], [2, 1]]


def test_packed_batches_count_real_tokens_and_are_not_sorted():
    lengths = lognormal_lengths(2_000)
    plan = plan_batches(lengths, [[i] for i in range(2_000)], 8, seed=0, epoch=0, max_tokens=8192, packed=True)
    assert sorted(i for b in plan for i in b) == list(range(2_000))
    assert all(sum(lengths[i] for i in b) <= 8192 or len(b) == 1 for b in plan)
    assert padding_efficiency(lengths, plan, packed=True) == 1.0
    # Without sorting, a batch mixes short and long rows (a padded batch this mixed would waste a lot).
    assert padding_efficiency(lengths, plan) < 0.8


def test_budget_from_probe_arithmetic():
    # 2 rows x 1000 tokens raised peak memory by 200 MB -> 100 kB a token; 80% of 10 GB free -> 80,000 tokens.
    assert budget_from_probe(200_000_000, 2_000, 10_000_000_000, longest=1000) == 80_000 - 80_000 % 256
    # Never below one longest row, even when memory is short.
    assert budget_from_probe(200_000_000, 2_000, 1_000_000, longest=1280) == 1280


def test_auto_budget_is_rows_on_cpu_and_inference_matches_row_batches(tiny_project):
    import torch

    from kagglekit.batching import auto_max_tokens
    from kagglekit.engine import infer_logits
    from kagglekit.modeling import load_backbone, load_tokenizer

    def never(rows, length):
        raise AssertionError("no probe on CPU")

    assert auto_max_tokens(never, 100, torch.device("cpu")) is None
    cfg = tiny_config(tiny_project)
    tok = load_tokenizer(cfg.model.backbone)
    model = load_backbone(cfg.model, tok, torch.device("cpu")).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, model.config.vocab_size, size=int(n)).tolist() for n in rng.integers(3, 90, size=40)]
    rows = infer_logits(model, seqs, tok.pad_token_id, 4)
    budget = infer_logits(model, seqs, tok.pad_token_id, 4, max_tokens=300)
    auto = infer_logits(model, seqs, tok.pad_token_id, 4, max_tokens="auto")
    np.testing.assert_allclose(budget, rows, atol=1e-5)
    np.testing.assert_array_equal(auto, rows)


def test_training_with_a_token_budget(tiny_project, tmp_path, monkeypatch):
    """train.max_tokens sizes every micro-batch by padded tokens; 'auto' on CPU means rows and is recorded."""
    import kagglekit.train as train_mod

    seen = []
    real = train_mod.forward_logits

    def spy(s, seqs, segs=None):
        seen.append((len(seqs), max(len(x) for x in seqs)))
        return real(s, seqs, segs)

    monkeypatch.setattr(train_mod, "forward_logits", spy)
    m = train_mod.train_fold(tiny_config(tiny_project, "train.max_tokens=400", "train.max_steps=6"), 0, tmp_path / "run")
    assert m["steps"] == 6 and np.isfinite(m["val_log_loss"])
    assert seen and all(rows * width <= 400 or rows == 1 for rows, width in seen)
    assert len({rows for rows, _ in seen}) > 1  # the row count follows the lengths
    seen.clear()
    cfg = tiny_config(tiny_project, "train.max_tokens=auto", "train.max_steps=2")
    train_mod.train_fold(cfg, 1, tmp_path / "run")
    # On CPU 'auto' means batches of train.batch_size rows (evaluation goes through predict_pairs, not here).
    assert seen and max(rows for rows, _ in seen) == cfg.train.batch_size


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2"])
def test_packed_logits_match_the_padded_path(tiny_project, tmp_path, arch):
    import torch

    from kagglekit.engine import pad_batch
    from kagglekit.modeling import build_model, load_tokenizer, packed_logits
    from kagglekit.tiny import build_tiny_model

    path = tiny_project / "llama" if arch == "llama" else build_tiny_model(tmp_path / arch, arch, str(tiny_project / "train.csv"),
                                                                           vocab_size=400, hidden=64)
    cfg = tiny_config(tiny_project, f"model.backbone={path}", "lora.dropout=0")
    tok = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    model = build_model(cfg, tok, torch.device("cpu")).eval()
    rng = np.random.default_rng(0)
    vocab = model.get_base_model().config.vocab_size
    seqs = [rng.integers(5, vocab, size=int(n)).tolist() for n in (37, 5, 64, 12, 50)]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        packed = packed_logits(model, seqs, torch.device("cpu"))
    assert packed.shape == (5, 3)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
    # A row's logits do not depend on its neighbours (no attention across the packed rows).
    with torch.no_grad():
        alone = packed_logits(model, seqs[2:3], torch.device("cpu"))
    torch.testing.assert_close(alone[0], packed[2], atol=1e-4, rtol=1e-4)


def test_packed_training_runs_and_encoders_refuse(tiny_project, tmp_path):
    from kagglekit.errors import KKError
    from kagglekit.predict import predict_fold
    from kagglekit.train import train_fold

    cfg = tiny_config(tiny_project, "train.packing=true", "train.max_tokens=600", "train.max_steps=4", arch="llama")
    m = train_fold(cfg, 0, tmp_path / "run")
    assert m["steps"] == 4 and np.isfinite(m["val_log_loss"])
    assert json.loads((tmp_path / "run/fold_0/metrics.json").read_text())["steps"] == 4
    df = predict_fold(tmp_path / "run", 0, tiny_project / "test.csv")
    assert np.allclose(df[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().sum(1), 1)
    with pytest.raises(KKError, match="train.packing: deberta-v2 is an encoder"):
        train_fold(tiny_config(tiny_project, "train.packing=true", "train.max_steps=1"), 0, tmp_path / "enc")
    assert not (tmp_path / "enc" / "fold_0" / "metrics.json").exists()


def test_an_auto_budget_is_kept_on_resume(tiny_project, tmp_path, monkeypatch):
    """A GPU's free memory differs between runs; --resume must replay the batches the run started with."""
    import kagglekit.batching as batching
    import kagglekit.train as train_mod
    from kagglekit.train import Interrupted

    budgets = iter([500, 9_999])
    monkeypatch.setattr(batching, "auto_max_tokens", lambda *a, **k: next(budgets))  # what a GPU would measure
    cfg = tiny_config(tiny_project, "train.max_tokens=auto", "train.max_steps=8", "predict.max_tokens=0")
    real, calls, widths = train_mod.forward_logits, [0], []

    def cut_at_5(s, seqs, segs=None):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        widths.append(len(seqs) * max(len(x) for x in seqs))
        return real(s, seqs, segs)

    monkeypatch.setattr(train_mod, "forward_logits", cut_at_5)
    with pytest.raises(Interrupted):
        train_mod.train_fold(cfg, 2, tmp_path / "run")
    assert json.loads((tmp_path / "run/fold_2/checkpoint/batching.json").read_text())["max_tokens"] == 500  # and the device
    monkeypatch.setattr(train_mod, "forward_logits", lambda s, seqs, segs=None: widths.append(len(seqs) * max(map(len, seqs))) or real(s, seqs, segs))
    train_mod.train_fold(cfg, 2, tmp_path / "run", resume=True)
    assert next(budgets) == 9_999  # the resumed run did not measure again
    assert widths and max(widths) <= 500
