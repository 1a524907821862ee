"""The notebook's cells: what Kaggle executes, top to bottom (find inputs, install offline, predict)."""

from __future__ import annotations

from ..task import LMSYS, Task

NOTEBOOK_INTRO = """# {slug}: kagglekit offline inference

Built by `kk kernel` (kagglekit {version}). Runs with the internet off: installs kagglekit from the attached
wheels dataset, loads every fold's adapter from the artifacts dataset, predicts `{test_file}` with A/B swap
test-time augmentation and length-sorted batches (fp16 on T4, both GPUs when there are two), and writes
`/kaggle/working/submission.csv` ({task}: {submission}): the one-order pass of every fold first, then the swapped-order
pass as far as the time budget ({budget_h:g} h) allows (`/kaggle/working/kk_passes.json` says which passes ran)."""

CELL_FIND = '''import os, sys, json, time, subprocess
from pathlib import Path

ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # the dry run points this at a fake tree
INPUT, WORK = ROOT / "input", ROOT / "working"
T0 = time.time()

def find_all(name, must_have=None, max_depth=7):
    """Every folder under /kaggle/input holding `name` (and `must_have`), whatever the mount layout."""
    hits = []
    for dirpath, dirnames, filenames in os.walk(INPUT, followlinks=True):
        if dirpath[len(str(INPUT)):].count(os.sep) >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        if name in filenames and (must_have is None or must_have in filenames):
            hits.append(Path(dirpath))
    return hits

def find(name, must_have=None, prefer=None):
    """The one folder holding `name`; with several, the one under the `prefer` slug; else one clear error."""
    hits = find_all(name, must_have)
    if not hits:
        raise FileNotFoundError(f"no {name} under {INPUT}: is the dataset attached?")
    if len(hits) > 1 and prefer:
        preferred = [h for h in hits if prefer in h.relative_to(INPUT).parts]
        hits = preferred or hits
    if len(hits) > 1:
        raise RuntimeError(f"{len(hits)} folders under {INPUT} hold {name}: " + ", ".join(map(str, hits)) + "; detach all but one")
    return hits[0]

WHEELS = find("kk_wheels.json")
ARTIFACTS = find("kk_manifest.json")
# The competition's own folder, not an attached dataset that happens to carry a test file too.
TEST_FILE = "test.csv"  # kk kernel writes its task's test file here (test.parquet for WSDM)
COMPETITION = find(TEST_FILE, must_have="sample_submission.csv", prefer="{competition}")
print("wheels:", WHEELS, "\\nartifacts:", ARTIFACTS, "\\ncompetition:", COMPETITION)'''

CELL_INSTALL = '''# Offline install: no index, only the attached wheels. Kaggle's image already has torch, transformers, peft.
SITE = Path(os.environ.get("KK_SITE", "/tmp/kk_site"))
wheels = [str(WHEELS / w) for w in json.loads((WHEELS / "kk_wheels.json").read_text())["wheels"]]
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", str(SITE), *wheels], check=True)
sys.path.insert(0, str(SITE))
import kagglekit
print("kagglekit", kagglekit.__version__)'''

CELL_RUN = '''from kagglekit.kernel.offline import run_offline

# Budgeted passes: (A,B) for every fold and a complete submission first, then (B,A) as far as the time
# budget allows (counted from the first cell, T0); kk_passes.json says which passes ran.
report = run_offline(ARTIFACTS, COMPETITION / TEST_FILE, WORK / "submission.csv",
                     sample_submission=COMPETITION / "sample_submission.csv", input_root=INPUT, started=T0)
print(json.dumps({k: v for k, v in report.items() if k != "timings"}, indent=1))'''

CELL_DONE = '''import pandas as pd
sub = pd.read_csv(WORK / "submission.csv")
print(sub.shape, "in", round(time.time() - T0, 1), "s")
sub.head()'''


def make_notebook(slug: str, budget_h: float = 8.0, task: Task = LMSYS):
    """The notebook for ``task``'s competition: its input folder and test file, its submission."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from .. import __version__

    find_cell = CELL_FIND.replace("{competition}", task.competition).replace('TEST_FILE = "test.csv"', f'TEST_FILE = "{task.test_file}"')
    intro = NOTEBOOK_INTRO.format(slug=slug, version=__version__, test_file=task.test_file, task=task.name,
                                  submission=",".join(("id", *task.submission_columns)), budget_h=budget_h)
    nb = new_notebook(
        cells=[new_markdown_cell(intro), new_code_cell(find_cell),
               new_code_cell(CELL_INSTALL), new_code_cell(CELL_RUN), new_code_cell(CELL_DONE)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "language_info": {"name": "python"}},
    )
    nb.nbformat, nb.nbformat_minor = 4, 5  # v4.5: cells carry ids
    return nb


# --- what the notebook runs ---------------------------------------------------------------------------------------


