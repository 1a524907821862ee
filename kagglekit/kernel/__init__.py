"""`kk kernel`: package inference as an offline Kaggle notebook, and dry-run it here.

``build_kernel`` writes ``kernels/<name>/``: ``kernel/`` (the notebook, kernel-metadata.json: what
``kaggle kernels push -p`` takes), ``datasets/<name>-artifacts/`` (folds, resolved configs, tokenizers, local
backbones, kk_manifest.json) and ``datasets/<name>-wheels/`` (kagglekit's wheel and the extra wheels). The notebook
finds its inputs by sentinel files, installs from the wheels without the network and calls :func:`run_offline`:
the orchestrator and blend of ``kk ensemble`` (:mod:`kagglekit.passes`, :func:`kagglekit.ensemble.blend`).

- ``build``    (user's machine) the plan, the notebook folder, the artifact and wheel datasets
- ``plan``     (both) where each run's model goes on the GPUs (meta device) and the hours estimate
- ``notebook`` the cells Kaggle executes; ``offline`` (ON KAGGLE) :func:`run_offline`: folds -> submission.csv
- ``dryrun``   (user's machine) execute the notebook offline in a fake /kaggle; ``push`` the kaggle CLI

``offline`` and ``plan`` import nothing from ``build``, ``dryrun`` or ``push``.
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
