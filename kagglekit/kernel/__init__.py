"""`kk kernel`: package inference as an offline Kaggle notebook, and dry-run it here.

Kaggle code competitions run the notebook with the internet off and score what it
writes to ``/kaggle/working/submission.csv``. ``build_kernel`` writes::

    kernels/<name>/
      kernel/<name>.ipynb, kernel-metadata.json    what `kaggle kernels push -p` takes
      datasets/<name>-artifacts/                   fold adapters, resolved configs, tokenizers,
                                                   local backbones, kk_manifest.json, dataset-metadata.json
      datasets/<name>-wheels/                      kagglekit's wheel (+ extra wheels), kk_wheels.json,
                                                   dataset-metadata.json

The notebook finds its inputs by sentinel files (whichever mount layout Kaggle
uses), installs kagglekit from the bundled wheels without the network, and calls
:func:`run_offline` here: the same fold models, swap TTA, length-sorted batches,
combination and submission checks as ``kk ensemble``.

Layout, by where the code runs:

- ``build``    (user's machine) the plan, the notebook folder, the artifact and wheel datasets
- ``plan``     (both) where each run's model goes on the GPUs (meta device) and the hours estimate
- ``notebook`` (the notebook's text) the cells Kaggle executes
- ``offline``  (ON KAGGLE) :func:`run_offline`: fold models -> submission.csv
- ``passes``   (ON KAGGLE) the budgeted passes: one order first, then the swapped order as time allows
- ``dryrun``   (user's machine) execute the notebook offline in a fake /kaggle
- ``push``     (user's machine) the kaggle CLI

``offline``, ``passes`` and ``plan`` import nothing from ``build``, ``dryrun`` or ``push``.
"""

from .build import build_kernel, build_wheel, kaggle_user, slugify
from .common import FOLD_FILES, HIDDEN_TEST_ROWS, KAGGLE_LIMIT_H, MACHINE_SHAPES, MANIFEST, WHEELS_SENTINEL
from .dryrun import dry_run
from .notebook import CELL_DONE, CELL_FIND, CELL_INSTALL, CELL_RUN, NOTEBOOK_INTRO, make_notebook
from .offline import run_offline
from .push import push

__all__ = ["build_kernel", "build_wheel", "kaggle_user", "slugify", "dry_run", "make_notebook", "run_offline", "push",
           "CELL_DONE", "CELL_FIND", "CELL_INSTALL", "CELL_RUN", "NOTEBOOK_INTRO", "FOLD_FILES",
           "HIDDEN_TEST_ROWS", "KAGGLE_LIMIT_H", "MACHINE_SHAPES", "MANIFEST", "WHEELS_SENTINEL"]
