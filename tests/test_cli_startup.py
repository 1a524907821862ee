from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "sklearn", "optuna")


def test_cli_import_stays_light():
    # `kk --help` must answer at once: importing the CLI must not pull any heavy library.
    code = f"import sys, kagglekit.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_help_lists_commands_and_every_command_has_an_example():
    from conftest import run_cli

    r = run_cli("--help")
    assert r.exit_code == 0
    from kagglekit.cli import app

    names = [c.name for c in app.registered_commands]
    for name in names:
        assert name in r.stdout
        sub = run_cli(name, "--help")
        assert sub.exit_code == 0 and "Example" in sub.stdout, name
