"""Issue 24 items 20, 21, 22, 26 and the dry run's temporary folders: every bad input to kk kernel is one
line naming what is wrong, before any long work."""

from __future__ import annotations

import json
import os
import stat
import sys
import zipfile

import pytest

from conftest import run_cli
from kagglekit.errors import KKError


@pytest.fixture
def small_kernel(tmp_path):
    """The files --dry-run reads first: kernel metadata, a notebook, a dataset's metadata (no wheels: the
    notebook fails at once, which the failure test wants)."""
    from kagglekit.kernel import make_notebook

    k = tmp_path / "k"
    (k / "kernel").mkdir(parents=True)
    import nbformat

    nbformat.write(make_notebook("small-kernel"), str(k / "kernel" / "small-kernel.ipynb"))
    (k / "kernel" / "kernel-metadata.json").write_text(json.dumps({"id": "alice/small-kernel", "code_file": "small-kernel.ipynb"}))
    (k / "datasets" / "small-kernel-artifacts").mkdir(parents=True)
    (k / "datasets" / "small-kernel-artifacts" / "dataset-metadata.json").write_text(json.dumps({"id": "alice/small-kernel-artifacts"}))
    return k


def _script(path, body: str):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_python_probe_needs_a_python_that_can_run_the_notebook(small_kernel, tmp_path):
    from kagglekit.kernel import dry_run

    with pytest.raises(KKError, match=r"--python /bin/true: not a Python that can run the notebook \(exit status 0, no answer"):
        dry_run(small_kernel, python="/bin/true")
    fake = _script(tmp_path / "py", 'echo "kk-probe 3.12.1 ipykernel (ModuleNotFoundError);torch (ModuleNotFoundError)"')
    with pytest.raises(KKError, match=r"\(Python 3\.12\.1\) cannot run the notebook: missing ipykernel .*, torch"):
        dry_run(small_kernel, python=fake)
    with pytest.raises(KKError, match="not a Python that can run the notebook"):
        dry_run(small_kernel, python=str(tmp_path / "no-such-python"))
    r = run_cli("kernel", "--dry-run", small_kernel, "--python", "/bin/true")
    assert r.exit_code == 1 and "not a Python" in r.stderr and "Traceback" not in r.output
    from kagglekit.kernel.dryrun import check_python

    assert check_python(sys.executable).count(".") == 2  # this interpreter has everything


@pytest.mark.parametrize("which,content", [("kernel", "{"), ("kernel", "[]"), ("kernel", '{"id": "a/b"}'),
                                           ("dataset", "{\"id\": "), ("dataset", '{"title": "x"}'),
                                           ("dataset", '{"id": "../../x"}')])
def test_damaged_metadata_is_one_line_naming_the_file(small_kernel, which, content):
    path = (small_kernel / "kernel" / "kernel-metadata.json" if which == "kernel"
            else small_kernel / "datasets" / "small-kernel-artifacts" / "dataset-metadata.json")
    path.write_text(content)
    r = run_cli("kernel", "--dry-run", small_kernel)
    assert r.exit_code == 1 and str(path) in r.stderr and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) <= 2  # one line (the terminal may wrap it)


def test_user_names_are_checked(tmp_path, monkeypatch):
    from kagglekit.kernel import kaggle_user

    for bad in ("../../x", "a/b", "bob smith", "-x", "x" * 51, ".hidden"):
        with pytest.raises(KKError, match="is not a Kaggle user name"):
            kaggle_user(bad)
    assert kaggle_user("alice-01_b") == "alice-01_b"
    monkeypatch.setenv("KAGGLE_USERNAME", "../etc")
    with pytest.raises(KKError, match="KAGGLE_USERNAME: '../etc' is not a Kaggle user name"):
        kaggle_user(None)
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "a/../b", "key": "secret"}))
    with pytest.raises(KKError, match=r"kaggle\.json: 'a/\.\./b' is not a Kaggle user name"):
        kaggle_user(None)
    r = run_cli("kernel", "--run", tmp_path, "--name", "some-kernel", "--user", "../../x", "--out", tmp_path / "k")
    assert r.exit_code == 1 and "is not a Kaggle user name" in r.stderr and not (tmp_path / "k").exists()


def make_wheel(path, name="extra", metadata=True):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        if metadata:
            z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
            z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path


def test_wheels_are_checked_by_name_and_content(tmp_path):
    from kagglekit.kernel.build import check_wheel

    good = make_wheel(tmp_path / "extra-1.0-py3-none-any.whl")
    assert check_wheel(good) == good
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    corrupt = tmp_path / "corrupt-1.0-py3-none-any.whl"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    bare = make_wheel(tmp_path / "bare-1.0-py3-none-any.whl", "bare", metadata=False)
    misnamed = make_wheel(tmp_path / "extra.whl")
    for path, why in ((txt, "not a wheel file name"), (misnamed, "not a wheel file name"), (corrupt, "not a valid wheel archive"),
                      (bare, r"no \*\.dist-info/METADATA inside"), (tmp_path / "missing-1.0-py3-none-any.whl", "does not exist")):
        with pytest.raises(KKError, match=why):
            check_wheel(path)


def test_bad_wheel_machine_shape_or_name_refused_before_any_work(tmp_path):
    """The checks run before the runs are even read: nothing is written."""
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    out = tmp_path / "k"
    for args, why in ((["--wheel", txt], "not a wheel file name"),
                      (["--machine-shape", "NvidiaTeslaP100"], "no kernels for the P100's sm_60"),
                      (["--machine-shape", "TPU"], "--machine-shape must be one of")):
        r = run_cli("kernel", "--run", tmp_path / "no-run", "--name", "good-name", "--user", "bob", "--out", out, *args)
        assert r.exit_code == 1 and why in r.stderr and "Traceback" not in r.output, r.output
    r = run_cli("kernel", "--run", tmp_path / "no-run", "--name", "abc", "--user", "bob", "--out", out)
    assert r.exit_code == 1 and "at least 5" in r.stderr  # the kaggle CLI refuses shorter kernel slugs
    assert not out.exists()


def test_a_failed_dry_run_leaves_no_temporary_folder(small_kernel, tmp_path, monkeypatch):
    """The notebook fails (no wheels attached): one line, the executed notebook kept beside the kernel, and
    no kk-dry-run-* folder left in the temporary directory."""
    import tempfile

    from kagglekit.kernel import dry_run

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    with pytest.raises(KKError, match=r"the kernel failed in the dry run: .*no kk_wheels.json"):
        dry_run(small_kernel)
    assert not list((tmp_path / "tmp").glob("kk-dry-run-*"))
    assert (small_kernel / "dry-run" / "executed.ipynb").exists()
