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

from conftest import REPO, run_cli
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
    r = run_cli("config", "--set", "tune.lora.r={choices: [&x [8, 8, 8], [*x, *x, *x]]}")
    _one_error_line(r, "--set tune.lora.r", "aliases (*x)")
    r = run_cli("config", "--set", "data.train=*.csv")  # an undefined alias is still the text as given
    assert r.exit_code == 0 and "train: '*.csv'" in r.stdout
    # and absurd nesting is one line, not a RecursionError
    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "deep.yaml").write_text(f"name: x\nseed: {deep}\n")
    _one_error_line(run_cli("config", tmp_path / "deep.yaml"), "deep.yaml", "nested too deeply")
    _one_error_line(run_cli("config", "--set", f"seed={deep}"), "--set seed", "nested too deeply")


def test_the_yaml_kagglekit_writes_has_no_aliases(tmp_path):
    import yaml

    from kagglekit.config import _PlainDumper, read_yaml

    shared = [8, 16]
    data = {"tune": {"lora.r": {"choices": shared}, "lora.alpha": {"choices": shared}}}
    assert "&" in yaml.safe_dump(data)  # what a plain dump of a shared value gives: our reader refuses it
    (tmp_path / "c.yaml").write_text(yaml.dump(data, Dumper=_PlainDumper))
    assert read_yaml(tmp_path / "c.yaml") == data


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
    # bounded work, whatever the cell's size: at most 16 characters per token of budget, of each end
    assert max(map(len, seen)) <= 2 * 16 * fmt.budget < len(huge) / 100
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


# --- 13. damaged .safetensors files ---------------------------------------------------------------------------------

def _damage(path) -> None:
    """A header whose length points past the end of the file: what a cut-off or overwritten file looks like."""
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"x": garbage')


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the trained 3-fold run, without cached test predictions."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in run.glob("fold_*/test.*"):
        f.unlink()
    return run


def test_a_damaged_backbone_file_is_one_line(tiny_project, tmp_path):
    bad = tmp_path / "backbone"
    shutil.copytree(tiny_project / "deberta", bad)
    _damage(bad / "model.safetensors")
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={bad}", "--set", "model.max_length=96", "--set", "train.max_steps=1")
    _one_error_line(r, bad / "model.safetensors", "not a readable .safetensors file")


def test_a_damaged_adapter_file_is_one_line(run_copy, tiny_project, tmp_path):
    _damage(run_copy / "fold_1" / "adapter_model.safetensors")
    r = run_cli("predict", "--run", run_copy, "--fold", "1", "--test", tiny_project / "test.csv")
    _one_error_line(r, run_copy / "fold_1" / "adapter_model.safetensors", "not a readable .safetensors file")
    r = run_cli("merge", "--run", run_copy, "--out", tmp_path / "merged")
    _one_error_line(r, run_copy / "fold_1" / "adapter_model.safetensors")
    assert not (tmp_path / "merged").exists()


def test_load_safetensors_names_the_file(tmp_path):
    from kagglekit.io import load_safetensors

    _damage(tmp_path / "w.safetensors")
    with pytest.raises(KKError, match=f"{tmp_path / 'w.safetensors'}: not a readable .safetensors file"):
        load_safetensors(tmp_path / "w.safetensors")


# --- 14. hostile adapter_config.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ("{not json", "not valid JSON"),
    ([1, 2], "not a JSON object"),
    ({"r": 100_000}, "r must be an integer from 1 to 1024"),
    ({"r": 10**9}, "r must be an integer from 1 to 1024"),
    ({"r": 4}, "r is 4 but adapter_model.safetensors holds rank 8"),
    ({"lora_alpha": "abc"}, "lora_alpha must be a positive number"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type must be LORA"),
    ({"target_modules": ["no_such_proj"]}, "target_modules ['no_such_proj'] matches no module"),
])
def test_a_hostile_adapter_config_is_one_line(run_copy, tiny_project, change, needle):
    path = run_copy / "fold_0" / "adapter_config.json"
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    else:
        path.write_text(change if isinstance(change, str) else json.dumps(change))
    r = run_cli("predict", "--run", run_copy, "--fold", "0", "--test", tiny_project / "test.csv")
    _one_error_line(r, path, needle)


def test_merge_checks_adapter_configs_first(run_copy, tmp_path):
    path = run_copy / "fold_2" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 10**9}))
    _one_error_line(run_cli("merge", "--run", run_copy, "--out", tmp_path / "m"), path, "r must be")


def test_an_r_that_does_not_fit_the_layers_is_refused(run_copy, tiny_project):
    """r 96 on 64 -> 64 layers, with weights of that rank (zero-padded from the trained r 8): peft builds it
    without a word; it is refused."""
    from safetensors.torch import load_file, save_file

    fold = run_copy / "fold_0"
    state = load_file(str(fold / "adapter_model.safetensors"))
    for k, v in state.items():
        if ".lora_A." in k:
            state[k] = torch_pad(v, rows=96)
        elif ".lora_B." in k:
            state[k] = torch_pad(v.T, rows=96).T.contiguous()
    save_file(state, str(fold / "adapter_model.safetensors"))
    cfg = json.loads((fold / "adapter_config.json").read_text())
    (fold / "adapter_config.json").write_text(json.dumps({**cfg, "r": 96}))
    r = run_cli("predict", "--run", run_copy, "--fold", "0", "--test", tiny_project / "test.csv")
    _one_error_line(r, fold / "adapter_config.json", "r 96 does not fit", "(64 -> ")


def torch_pad(t, rows: int):
    import torch

    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)])


# --- 17. disk full while writing .safetensors ---------------------------------------------------------------------

@pytest.fixture
def safetensors_disk_full(monkeypatch):
    """Every safetensors write (transformers', peft's, kagglekit's) fails as it does on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)


def test_tiny_model_on_a_full_disk_leaves_no_folder(tmp_path, safetensors_disk_full):
    out = tmp_path / "models" / "tiny"
    r = run_cli("tiny-model", out, "--vocab-size", "300")
    _one_error_line(r, f"{out}: No space left on device")
    assert not out.exists() and not list(out.parent.iterdir())  # no half folder, no temporary one


def test_train_and_merge_on_a_full_disk_are_one_line(tiny_run, tiny_project, tmp_path, safetensors_disk_full):
    r = run_cli("merge", "--run", tiny_run, "--out", tmp_path / "merged")
    _one_error_line(r, f"{tmp_path / 'merged'}: No space left on device")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96",
                "--set", "train.max_steps=1", "--set", "train.eval_every=1")
    _one_error_line(r, tmp_path / "run" / "fold_0", "No space left on device")


# --- 18. disk full and read-only folders name the output ----------------------------------------------------------

@pytest.fixture
def no_space(monkeypatch):
    """Writes of CSV/text files whose name holds the armed target fail as on a full disk: no file name
    in the error, as the OS reports it from write()."""
    targets = []

    def arm(target: str):
        targets[:] = [target]

    real_csv, real_text = pd.DataFrame.to_csv, type(REPO).write_text

    def to_csv(self, path=None, *a, **k):
        if path is not None and any(t in str(path) for t in targets):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_csv(self, path, *a, **k)

    def write_text(self, *a, **k):
        if any(t in str(self) for t in targets):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_text(self, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    monkeypatch.setattr(type(REPO), "write_text", write_text)
    return arm


def test_a_full_disk_names_the_output(synth_train, run_copy, tiny_project, tmp_path, no_space):
    no_space(".out.csv.")
    _one_error_line(run_cli("synth", "--n", "20", "--out", tmp_path / "out.csv"), f"{tmp_path / 'out.csv'}: No space left on device")
    _one_error_line(run_cli("make-folds", "--train", synth_train, "--out", tmp_path / "out.csv"),
                    f"{tmp_path / 'out.csv'}: No space left on device")
    no_space(".sub.csv.")
    _one_error_line(run_cli("ensemble", "--run", run_copy, "--folds", "0", "--test", tiny_project / "test.csv",
                            "--out", tmp_path / "sub.csv"), f"{tmp_path / 'sub.csv'}: No space left on device")
    no_space(".test.csv.")
    _one_error_line(run_cli("predict", "--run", run_copy, "--fold", "0", "--test", tiny_project / "test.csv", "--force"),
                    f"{run_copy / 'fold_0' / 'test.csv'}: No space left on device")
    no_space(".r.html.")
    _one_error_line(run_cli("report", "--run", run_copy, "--out", tmp_path / "r.html"), f"{tmp_path / 'r.html'}: No space left on device")
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_read_only_folder_names_the_output_not_the_temporary_file(synth_train, tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, dir=None, prefix="", suffix="", **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    err = _one_error_line(run_cli("synth", "--n", "20", "--out", tmp_path / "out.csv"), f"{tmp_path / 'out.csv'}: Read-only file system")
    assert "x1y2z3" not in err
    _one_error_line(run_cli("tiny-model", tmp_path / "tiny", "--vocab-size", "300"), f"{tmp_path / 'tiny'}: Read-only file system")


@pytest.fixture
def tiny_mounts(tmp_path):
    """A 64 KiB tmpfs (a disk that fills) and a read-only one, for real OS errors; needs root, skipped otherwise."""
    import subprocess

    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    mounted = []
    for path, opts in ((full, "size=64k"), (ro, "ro,size=64k")):
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                               capture_output=True).returncode != 0:
            for p in mounted:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
    yield full, ro
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_real_full_and_read_only_disks(tiny_mounts):
    full, ro = tiny_mounts
    _one_error_line(run_cli("synth", "--n", "2000", "--out", full / "train.csv"), f"{full / 'train.csv'}: No space left on device")
    _one_error_line(run_cli("tiny-model", full / "tiny", "--vocab-size", "300"), f"{full / 'tiny'}: No space left on device")
    assert sorted(p.name for p in full.iterdir()) == []  # no half folder, no temporary file
    _one_error_line(run_cli("synth", "--n", "20", "--out", ro / "train.csv"), f"{ro / 'train.csv'}: Read-only file system")


# --- 19. kk tune: one line per failed trial, no tracebacks --------------------------------------------------------

@pytest.fixture
def optuna_records():
    import logging

    pytest.importorskip("optuna")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_tune_trials_with_invalid_values_fail_in_one_line(tiny_project, tmp_path, optuna_records):
    r = run_cli("tune", "--config", REPO / "configs/tiny.yaml", "--n-trials", "2", "--storage", f"sqlite:///{tmp_path / 't.db'}",
                "--study", "s", "--runs", tmp_path, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", "tune.lora.r={choices: [0]}")
    assert r.exit_code == 1 and "Traceback" not in r.output
    failed = [ln for ln in r.stderr.splitlines() if "failed: config error" in ln]
    assert len(failed) == 2 and all("lora.r: Input should be greater than or equal to 1" in ln for ln in failed)
    assert r.stderr.splitlines()[-1] == "error: all 2 trial(s) of this run failed (see the lines above)"
    assert not [rec for rec in optuna_records if rec.exc_info]


def test_tune_ctrl_c_logs_no_traceback(tiny_project, tmp_path, optuna_records, monkeypatch):
    import kagglekit.train as train

    def interrupted(*a, **k):
        raise train.Interrupted("interrupted at step 1 of fold 0")

    monkeypatch.setattr(train, "train_fold", interrupted)
    r = run_cli("tune", "--config", REPO / "configs/tiny.yaml", "--n-trials", "3", "--storage", f"sqlite:///{tmp_path / 't.db'}",
                "--study", "s", "--runs", tmp_path, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv")
    assert r.exit_code == 130
    assert not [rec for rec in optuna_records if rec.exc_info or "failed" in rec.getMessage()]


# --- 23. a binary or empty sample submission ----------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\xff\xfe", "cannot be read as CSV"),
    (b"id,winner_model_a,winner_model_b,winner_tie\n", "has a header but no rows"),
    (b"id,a,b\n1,2,3\n", "differ from the submission's"),
])
def test_a_bad_sample_submission_is_refused_before_predicting(run_copy, tiny_project, tmp_path, content, needle):
    sample = tmp_path / "sample.csv"
    sample.write_bytes(content)
    r = run_cli("ensemble", "--run", run_copy, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv",
                "--sample-submission", sample)
    _one_error_line(r, sample, needle)
    assert not list(run_copy.glob("fold_*/test.csv"))  # nothing was predicted


# --- 24. .safetensors outputs get the normal file mode ------------------------------------------------------------

def _normal():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _modes(folder):
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}


def test_weights_get_the_normal_file_mode(tiny_run, tmp_path):
    from kagglekit.kernel.build import _copy_fold
    from kagglekit.merge import merge_run
    from kagglekit.tiny import build_tiny_model

    normal = _normal()
    build_tiny_model(tmp_path / "tiny", vocab_size=300)
    assert set(_modes(tmp_path / "tiny").values()) == {normal}
    assert _modes(tiny_run / "fold_0")["adapter_model.safetensors"] == normal  # a trained fold
    for method in ("factors", "delta"):
        merged = merge_run(tiny_run, tmp_path / method, method=method)
        assert set(_modes(merged / "fold_0").values()) == {normal}, method
    src = tmp_path / "old_fold"
    shutil.copytree(tiny_run / "fold_0", src)
    os.chmod(src / "adapter_model.safetensors", 0o600)  # a fold trained before this fix
    _copy_fold(src, tmp_path / "kernel_fold")
    assert set(_modes(tmp_path / "kernel_fold").values()) == {normal}


# --- 25. duplicate column names -----------------------------------------------------------------------------------

def test_duplicate_columns_are_refused_in_every_reader(synth_train, tmp_path):
    from kagglekit.data import load_train, read_probs
    from kagglekit.folds import load_folds

    df = pd.read_csv(synth_train, dtype=str)
    dup = tmp_path / "train.csv"
    df.insert(0, "prompt_", df["response_b"])
    df.rename(columns={"prompt_": "prompt"}).to_csv(dup, index=False)  # a decoy prompt column first
    with pytest.raises(KKError, match=f"{dup}: column 'prompt' appears more than once"):
        load_train(dup)
    _one_error_line(run_cli("make-folds", "--train", dup, "--out", tmp_path / "f.csv"), dup, "'prompt' appears more than once")

    folds = tmp_path / "folds.csv"
    folds.write_text("id,id,fold\ndecoy1,a,0\ndecoy2,b,1\n")  # keyed by the decoy, silently, before
    with pytest.raises(KKError, match=f"{folds}: column 'id' appears more than once"):
        load_folds(folds)

    probs = tmp_path / "oof.csv"
    probs.write_text("id,winner_model_a,winner_model_b,winner_tie,winner_tie\nx,0.2,0.3,0.5,0.1\n")
    with pytest.raises(KKError, match=f"{probs}: column 'winner_tie' appears more than once"):
        read_probs(probs)
