"""Regressions of issue 31 (breaks found trying kk as a careless or hostile user would)."""

import gzip
import json
import shutil

import pandas as pd
import pytest

from conftest import REPO, run_cli


def test_merge_accepts_folds_whose_target_modules_peft_wrote_in_another_order(tiny_run, tmp_path):
    # peft writes target_modules from a set: a fold trained in another process lists them in another order.
    from kagglekit.merge import merge_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for k, order in ((0, ["query_proj", "key_proj", "value_proj"]), (1, ["value_proj", "query_proj", "key_proj"]), (2, ["key_proj", "value_proj", "query_proj"])):
        p = run / f"fold_{k}" / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg["target_modules"] = order
        p.write_text(json.dumps(cfg))
    assert (merge_run(run, tmp_path / "merged", check_rows=0) / "fold_0").is_dir()


def test_an_adapter_asking_for_megatron_is_refused_in_one_line(tiny_run, tmp_path):
    from kagglekit.adapters import read_adapter_config
    from kagglekit.errors import KKError

    fold = tmp_path / "fold_0"
    shutil.copytree(tiny_run / "fold_0", fold)
    cfg = json.loads((fold / "adapter_config.json").read_text())
    cfg["megatron_core"] = "os"
    (fold / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KKError, match="megatron_core"):
        read_adapter_config(fold)


@pytest.mark.parametrize("args", [["--set", "seed=-1"], ["--set", f"seed={2**32}"], ["--set", "train.threads=100000"],
                                  ["--set", "predict.threads=100000"]])
def test_out_of_range_seed_and_threads_are_refused_by_the_config(args):
    r = run_cli("config", *args)
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_seed_flag_out_of_numpys_range_is_refused(synth_train, tmp_path):
    r = run_cli("make-folds", "--train", synth_train, "--out", tmp_path / "f.csv", "--seed", str(2**32))
    assert r.exit_code != 0 and not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize("hours", [0, -0.0, -5, float("nan"), 25])
def test_time_budget_outside_0_24_hours_is_refused(hours):
    from kagglekit.errors import KKError
    from kagglekit.kernel.common import check_budget_h

    with pytest.raises(KKError, match="time-budget-h"):
        check_budget_h(hours)


# Case 1: code shipped in a backbone folder never runs, whatever stdin answers.
def _backbone_with_code(src, dst, model_type):
    shutil.copytree(src, dst)
    marker = dst / "RAN"
    (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'kk-evil'\n")
    conf = json.loads((dst / "config.json").read_text())
    conf.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"})
    (dst / "config.json").write_text(json.dumps(conf))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return marker


def test_kk_train_refuses_a_backbone_whose_architecture_is_its_own_code_even_with_yes_on_stdin(tiny_project, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    marker = _backbone_with_code(tiny_project / "deberta", tmp_path / "evil", "kk-evil")
    args = [sys.executable, "-m", "kagglekit.cli", "train", "--fold", "0", "--config", str(REPO / "configs/tiny.yaml"),
            "--run", str(tmp_path / "run"), "--set", f"model.backbone={tmp_path / 'evil'}", "--set", f"data.train={tiny_project / 'train.csv'}",
            "--set", f"data.folds={tiny_project / 'folds.csv'}", "--set", "model.max_length=64"]
    r = subprocess.run(args, input="y\ny\ny\n", capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "Traceback" not in r.stderr and "auto_map" in r.stderr and "[y/N]" not in r.stdout + r.stderr
    assert not marker.exists()


def test_every_loader_refuses_the_folder_and_a_native_type_with_auto_map_loads_without_running_it(tiny_project, tmp_path):
    from kagglekit.errors import KKError
    from kagglekit.kernel.plan import meta_model
    from kagglekit.modeling import count_parameters, load_tokenizer

    marker = _backbone_with_code(tiny_project / "deberta", tmp_path / "evil", "kk-evil")
    for load in (load_tokenizer, lambda p: meta_model(p, 3)):
        with pytest.raises(KKError, match="auto_map"):
            load(str(tmp_path / "evil"))
    assert count_parameters(str(tmp_path / "evil")) is None and not marker.exists()
    # A native architecture whose folder still lists its old custom code (as Phi-3's does) loads with transformers' own classes.
    native = _backbone_with_code(tiny_project / "deberta", tmp_path / "native", "deberta-v2")
    assert load_tokenizer(str(tmp_path / "native")) is not None and count_parameters(str(tmp_path / "native")) > 0
    assert not native.exists()


# Case 3: no command writes over one of its own inputs, --force or not, through a link or not.
def test_no_command_overwrites_its_own_input(tiny_run, tiny_project, synth_train, tmp_path):
    import hashlib

    test = tmp_path / "test.csv"
    shutil.copy(tiny_project / "test.csv", test)
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    link = tmp_path / "link.csv"
    link.symlink_to(synth_train)
    files = (synth_train, test, src)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for args in (["data", "import", "pairs", src, "--out", synth_train, "--train", synth_train, "--test", test, "--force"],
                 ["data", "import", "pairs", src, "--out", src, "--no-dedup", "--force"],
                 ["make-folds", "--train", synth_train, "--out", synth_train, "--force"],
                 ["make-folds", "--train", synth_train, "--out", link, "--force"],
                 ["ensemble", "--run", tiny_run, "--test", test, "--out", test, "--force"]):
        r = run_cli(*args)
        assert r.exit_code != 0 and "is the input" in r.output and "Traceback" not in r.output, (args, r.output)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} and link.is_symlink()


# Case 11: a study is named like a config; its trial folders and --keep-best-only stay under --runs.
@pytest.mark.parametrize("study", ["../elsewhere/x", "/tmp/kk-abs-study", "..", "a\\\\b"])
def test_tune_refuses_a_study_name_that_is_a_path(study, tmp_path):
    from conftest import REPO

    for args in (["--config", REPO / "configs/tiny.yaml", "--n-trials", "1"], ["--best"]):
        r = run_cli("tune", *args, "--study", study, "--runs", tmp_path / "runs", "--keep-best-only" if "--n-trials" in args else "--force")
        assert r.exit_code != 0 and "--study" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "runs").exists()


# Case 10: a tokenizer with more tokens than the model's embeddings is refused before training, not mid-run.
def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_training(tiny_project, tmp_path):
    from conftest import REPO

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_project / "deberta", backbone)
    conf = json.loads((backbone / "config.json").read_text())
    conf["vocab_size"] = 100  # the checkpoint's 600 rows are refused as mismatched and 100 fresh ones made
    (backbone / "config.json").write_text(json.dumps(conf))
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={backbone}", "--set", "model.max_length=64", "--set", "train.max_steps=2")
    assert r.exit_code != 0 and "Traceback" not in r.output and "100 rows" in r.output, r.output
    assert not (tmp_path / "run" / "fold_0").exists() and not list((tmp_path / "run").glob(".fold_0*"))  # nothing left behind


# Case 9: kk kernel --plan --rows FILE reads the file or refuses it; a short run folder still gets a valid slug.
def test_kernel_plan_refuses_rows_it_cannot_read_and_names_a_short_run(tiny_project, tmp_path):
    from kernel_fakes import make_fake_run

    run = make_fake_run(tiny_project, tmp_path / "t1", (0,), "llama")
    (tmp_path / "no_text.csv").write_text("id,x\n1,2\n")
    (tmp_path / "utf16.csv").write_bytes((tiny_project / "test.csv").read_text().encode("utf-16"))
    (tmp_path / "folder").mkdir()
    for rows in ("missing.csv", "folder", "no_text.csv", "utf16.csv"):
        r = run_cli("kernel", "--run", run, "--name", "plan-test", "--plan", "--rows", tmp_path / rows)
        assert r.exit_code != 0 and "--rows" in r.output and "Traceback" not in r.output, (rows, r.output)
    r = run_cli("kernel", "--run", run, "--plan", "--rows", tiny_project / "test.csv")
    assert r.exit_code == 0, r.output


# Smaller items: what a failed or forced `kk train` leaves behind, and a fold linked in from outside the run.
def test_a_failed_train_leaves_no_lock_and_no_fold_folder(tiny_project, tmp_path):
    from conftest import REPO

    run = tmp_path / "run"
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", run, "--train", tiny_project / "train.csv",
                "--folds", tiny_project / "folds.csv", "--set", f"model.backbone={tmp_path / 'no-such-backbone'}")
    assert r.exit_code != 0
    assert not list(run.glob(".fold_0*")) and not (run / "fold_0").exists()


def test_file_lock_removes_its_file_and_a_waiter_never_shares_a_removed_one(tmp_path):
    import threading

    from kagglekit.io import LockHeld, file_lock

    lock = tmp_path / ".x.lock"
    with file_lock(lock, "x"):
        with pytest.raises(LockHeld):
            with file_lock(lock, "x"):
                pass
        assert lock.exists()  # a refused caller does not remove the holder's file
    assert not lock.exists()
    inside, errors = [], []

    def worker():
        try:
            for _ in range(50):
                with file_lock(lock, "x", wait=30):
                    inside.append(1)
                    assert len(inside) == 1, "two holders at once"
                    inside.pop()
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and not lock.exists()


def test_force_over_a_symlinked_fold_leaves_no_old_link_and_a_fold_linked_from_outside_is_refused(tiny_run, tmp_path):
    from kagglekit.train import claim_fold

    elsewhere = tmp_path / "elsewhere" / "fold_0"
    shutil.copytree(tiny_run / "fold_0", elsewhere, ignore=shutil.ignore_patterns("test*"))  # no earlier test's predictions
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "fold_0")
    (run / "fold_0").symlink_to(elsewhere)
    r = run_cli("predict", "--run", run, "--fold", "0", "--test", tiny_run.parent / "x.csv")
    assert r.exit_code != 0 and "outside the run" in r.output and not (elsewhere / "test.csv").exists()
    with claim_fold(run / "fold_0", force=True, resume=False) as work:
        shutil.copytree(elsewhere, work, dirs_exist_ok=True)
    assert not (run / "fold_0").is_symlink() and not list(run.glob(".fold_0*")) and elsewhere.is_dir()


# --- cases 4-6 and the smaller ones: importers, parquet cells, folds, labels, distill-labels -------------------------




def _one_line_error(r, *names):
    """A refusal: non-zero exit, one line naming ``names``, no exception escaping the CLI."""
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert all(str(n) in lines[0] for n in names), r.output


def _hh(prompt, chosen, rejected, prompt_b=None):
    t = "\n\nHuman: {}\n\nAssistant: {}"
    return {"chosen": t.format(prompt, chosen), "rejected": t.format(prompt if prompt_b is None else prompt_b, rejected)}


def test_hh_rlhf_import_drops_what_pairs_drops(tmp_path):
    # identical chosen/rejected, different prompts on the two sides, an empty response: dropped by both layouts
    recs = [_hh(f"Question {i}?", f"Good {i}.", f"Bad {i}.") for i in range(3)]
    recs += [_hh("Same?", "Yes.", "Yes."), _hh("Left prompt", "a", "b", prompt_b="Right prompt"), _hh("Empty?", "", "no")]
    pairs = [{"prompt": "Left prompt", "chosen": "a", "rejected": "b"} if "Left" in r["chosen"] else
             {"prompt": r["chosen"].split("Human: ")[1].split("\n\n")[0], "chosen": r["chosen"].rsplit("Assistant: ", 1)[1],
              "rejected": r["rejected"].rsplit("Assistant: ", 1)[1]} for r in recs]
    pairs[4]["prompt"] = ["Left prompt"]
    pairs[4]["chosen"] = [{"role": "user", "content": "Left prompt"}, {"role": "assistant", "content": "a"}]
    pairs[4]["rejected"] = [{"role": "user", "content": "Right prompt"}, {"role": "assistant", "content": "b"}]
    kept = {}
    for fmt, rows in (("hh-rlhf", recs), ("pairs", pairs)):
        (tmp_path / f"{fmt}.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
        r = run_cli("data", "import", fmt, tmp_path / f"{fmt}.jsonl", "--out", tmp_path / f"{fmt}.csv", "--no-dedup")
        assert r.exit_code == 0, r.output
        for reason in ("chosen and rejected are the same text", "chosen and rejected have different prompts", "a response is empty"):
            assert any(reason in line and "1" in line for line in r.output.splitlines()), (fmt, r.output)
        kept[fmt] = len(pd.read_csv(tmp_path / f"{fmt}.csv"))
    assert kept == {"hh-rlhf": 3, "pairs": 3}


def _deep(n=100_000):
    return "[" * n + "]" * n


@pytest.mark.parametrize("fmt", ["hh-rlhf", "pairs", "arena", "ultrafeedback"])
@pytest.mark.parametrize("case", ["bad byte", "cut-off gz", "deep jsonl", "deep json array"])
def test_unreadable_importer_input_is_one_line_naming_file_and_line(tmp_path, fmt, case):
    good = json.dumps(_hh("Q?", "a", "b")).encode() + b"\n"
    if case == "bad byte":
        src, data, line = tmp_path / "s.jsonl", good + good + b'{"chosen": "caf\xe9"}\n', "line 3"
    elif case == "deep jsonl":
        src, data, line = tmp_path / "s.jsonl", good + b'{"chosen": ' + _deep().encode() + b"}\n", "line 2"
    elif case == "deep json array":
        src, data, line = tmp_path / "s.json", b"[" + _deep().encode() + b"]", "s.json"
    else:
        src, line = tmp_path / "s.jsonl.gz", "past line"
        data = gzip.compress(b"".join(json.dumps(_hh(f"Q{i} " + "x" * (i % 97), str(i), "b")).encode() + b"\n"
                                      for i in range(5000)))
        data = data[: len(data) // 2]
    src.write_bytes(data)
    r = run_cli("data", "import", fmt, src, "--out", tmp_path / "o.csv", "--no-dedup")
    _one_line_error(r, src.name, line)
    assert not (tmp_path / "o.csv").exists()


def test_lone_surrogates_in_imported_records_are_replaced_like_the_loaders(tmp_path):
    # the loader's policy for lone UTF-16 surrogates (kagglekit/data.py): replaced by U+FFFD, in ids and texts alike
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"id": "x\ud800", "prompt": "hi \ud800", "chosen": "a \udc00", "rejected": "b"}) + "\n"
                   + json.dumps(_hh("hi \ud800", "a \udfff", "b")) + "\n")
    from kagglekit.data import load_train

    for fmt in ("pairs", "hh-rlhf"):
        r = run_cli("data", "import", fmt, src, "--out", tmp_path / f"{fmt}.csv", "--no-dedup")
        assert r.exit_code == 0 and r.exception is None, (fmt, r.output, r.exception)
        df, report = load_train(tmp_path / f"{fmt}.csv")
        assert df["prompt"][0] == ["hi \ufffd"] and report.surrogates_fixed == 0


def test_jsonl_with_a_utf8_bom_is_read(tmp_path):
    rec = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([rec]).encode())
    for name in ("bom.jsonl", "bom.json"):
        r = run_cli("data", "import", "pairs", tmp_path / name, "--out", tmp_path / f"{name}.csv", "--no-dedup")
        assert r.exit_code == 0, r.output
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) == 1


def test_import_out_in_a_missing_folder_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Why?", "chosen": "Because.", "rejected": "No."}))
    out = tmp_path / "missing" / "deeper" / "x.csv"
    r = run_cli("data", "import", "pairs", tmp_path / "p.jsonl", "--out", out, "--no-dedup")
    _one_line_error(r, out.parent, "does not exist")
    assert not (tmp_path / "missing").exists()


def _wsdm_parquet(tmp_path, name="train.parquet", n=24):
    r = run_cli("synth", "--task", "wsdm", "--n", str(n), "--seed", "1", "--out", tmp_path / name)
    assert r.exit_code == 0, r.output
    return tmp_path / name


@pytest.mark.parametrize("kind", ["list", "struct"])
def test_parquet_text_column_that_is_not_text_despite_its_metadata_is_one_line(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = _wsdm_parquet(tmp_path)
    t = pq.read_table(src)
    values = t.column("response_a").to_pylist()
    arr = pa.array([[v] for v in values]) if kind == "list" else pa.array([{"text": v} for v in values])
    t = t.set_column(t.schema.get_field_index("response_a"), "response_a", arr).replace_schema_metadata(t.schema.metadata)
    pq.write_table(t, tmp_path / "bad.parquet")  # the pandas metadata still says response_a is str
    r = run_cli("make-folds", "--task", "wsdm", "--train", tmp_path / "bad.parquet", "--k", "2", "--out", tmp_path / "f.csv")
    _one_line_error(r, "bad.parquet", "response_a")


def test_predict_on_a_parquet_whose_text_column_is_a_list_is_one_line(tiny_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kagglekit.synthetic import make_synthetic

    df = make_synthetic(6, seed=1)[["id", "prompt", "response_a", "response_b"]]
    t = pa.Table.from_pandas(df, preserve_index=False)
    t = t.set_column(1, "prompt", pa.array([[p] for p in df["prompt"]])).replace_schema_metadata(t.schema.metadata)
    pq.write_table(t, tmp_path / "test.parquet")
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("test*"))  # predict writes beside the fold
    r = run_cli("predict", "--run", tmp_path / "run", "--fold", "0", "--test", tmp_path / "test.parquet")
    _one_line_error(r, "test.parquet", "prompt")
    assert not (tmp_path / "run" / "fold_0" / "test.csv").exists()


def test_wsdm_winner_is_read_alike_whatever_its_case_and_spaces(tmp_path):
    from kagglekit.data import load_train
    from kagglekit.task import WSDM

    src = _wsdm_parquet(tmp_path)
    df = pd.read_parquet(src)
    labels = load_train(src, task=WSDM)[0]["label"].tolist()
    for variant in (lambda w: w + " ", lambda w: w.upper(), lambda w: " " + w.title()):
        df.assign(winner=df["winner"].map(variant)).to_parquet(tmp_path / "v.parquet", index=False)
        r = run_cli("make-folds", "--task", "wsdm", "--train", tmp_path / "v.parquet", "--k", "2", "--out", tmp_path / "f.csv", "--force")
        assert r.exit_code == 0, r.output
        assert load_train(tmp_path / "v.parquet", task=WSDM)[0]["label"].tolist() == labels


def test_a_negative_fold_id_is_refused_naming_the_folds_file(synth_train, tmp_path):
    folds = tmp_path / "folds.csv"
    ids = pd.read_csv(synth_train, dtype=str)["id"]
    pd.DataFrame({"id": ids, "fold": [i % 2 - 1 for i in range(len(ids))]}).to_csv(folds, index=False)
    r = run_cli("train", "--fold", "all", "--config", REPO / "configs" / "tiny.yaml", "--folds", folds,
                "--set", f"data.train={synth_train}", "--run", tmp_path / "run")
    _one_line_error(r, folds, "0 or more")
    assert not (tmp_path / "run" / "fold_-1").exists()


def test_distill_labels_names_the_teachers_task_before_reading_the_train_file(tiny_run, tmp_path):
    teacher = tmp_path / "teacher"
    for fold in sorted(tiny_run.glob("fold_*")):
        (teacher / fold.name).mkdir(parents=True)
        shutil.copy(fold / "metrics.json", teacher / fold.name)
        cfg = (fold / "config.yaml").read_text()
        assert "task: lmsys" in cfg
        (teacher / fold.name / "config.yaml").write_text(cfg.replace("task: lmsys", "task: wsdm"))
    src = _wsdm_parquet(tmp_path)
    ids = pd.read_parquet(src)["id"].astype(str)
    pd.DataFrame({"id": ids, "fold": [i % 3 for i in range(len(ids))]}).to_csv(tmp_path / "folds.csv", index=False)
    r = run_cli("distill-labels", "--teacher", teacher, "--train", src, "--folds", tmp_path / "folds.csv", "--out", tmp_path / "soft")
    _one_line_error(r, teacher, "task wsdm", "--task wsdm")


def test_real_hh_rlhf_file_loses_exactly_its_rows_without_a_comparison(tmp_path):
    src = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not src.exists():
        pytest.skip("../shared/data/hh-rlhf is not present")
    r = run_cli("data", "import", "hh-rlhf", src, "--out", tmp_path / "hh.csv", "--no-dedup")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "hh.csv", dtype=str, keep_default_na=False)
    assert len(df) == 2309 and (df["response_a"] != df["response_b"]).all()  # 2,312 records, 3 with an empty answer
    assert all(any(t.strip() for t in json.loads(c)) for c in [*df["response_a"], *df["response_b"]])


# Smaller item: Ctrl-C during kk distill-labels leaves the labels folder as it was.
def test_distill_labels_interrupted_mid_way_writes_no_fold_file(tiny_project, tmp_path, monkeypatch):
    from test_distill import FakeFoldModel, _fake_teacher, _folds

    import kagglekit.predict

    class Interrupted(FakeFoldModel):
        def predict(self, df, *args, **kwargs):
            if self.fold == 1:
                raise KeyboardInterrupt
            return super().predict(df, *args, **kwargs)

    monkeypatch.setattr(kagglekit.predict, "FoldModel", Interrupted)
    teacher = _fake_teacher(tmp_path, "teacher1", _folds(tiny_project), pd.read_csv(tiny_project / "train.csv", dtype={"id": str}))
    out = tmp_path / "labels"
    out.mkdir()
    (out / "fold_0.csv").write_text("old")
    r = run_cli("distill-labels", "--teacher", teacher, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--out", out, "--force")
    assert r.exit_code != 0
    assert sorted(p.name for p in out.iterdir()) == ["fold_0.csv"] and (out / "fold_0.csv").read_text() == "old"


def test_budget_messages_name_minutes_and_seconds_not_zero_hours():
    from kagglekit.ui import duration

    assert [duration(s) for s in (-3, 0.4, 42, 90, 3599, 3600, 7380)] == ["0 s", "0 s", "42 s", "1.5 min", "60.0 min", "1.00 h", "2.05 h"]
