"""Usage errors through the installed console script, as a user runs it (issue 8, item 6).

A fresh install resolves whatever typer the bounds allow (0.29 raises its vendored
``typer._click`` exceptions, older typer the ``click`` package's), so these run the real
``compress`` executable of this environment in a subprocess rather than the entry function
in-process: usage line + one ``Error:`` line, exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "compress"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["quantize", "--bogus"], "--bogus"),
    (["quantise"], "quantise"),
    (["quantize", "x", "--bits", "four", "-o", "y"], "--bits"),
])
def test_usage_errors_are_one_error_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    p = _run(args, tmp_path)
    both = p.stdout + p.stderr
    assert p.returncode == 2, both
    assert "Traceback" not in both, both
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr
    assert "Usage:" in p.stderr, p.stderr
    assert not (tmp_path / "y").exists()


def test_bare_compress_prints_help(tmp_path: Path) -> None:
    p = _run([], tmp_path)
    both = p.stdout + p.stderr
    assert p.returncode in (0, 2), both
    assert "Traceback" not in both, both
    assert "Usage:" in both and "quantize" in both, both


def test_help_exits_0(tmp_path: Path) -> None:
    p = _run(["--help"], tmp_path)
    both = p.stdout + p.stderr
    assert p.returncode == 0, both
    assert "Traceback" not in both, both
    assert "Usage:" in p.stdout and "quantize" in p.stdout, both


@pytest.mark.parametrize("module", ["click.exceptions", "typer._click.exceptions"])
def test_both_click_flavours_are_usage_errors(module: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """Older typer raises the ``click`` package's UsageError, typer ≥ 0.29 its vendored copy:
    ``cli.main`` shows either as one ``Error:`` line with exit code 2."""
    import importlib

    import cli

    try:
        exc = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed")

    def raise_usage(*a, **k):  # noqa: ANN002, ANN003
        raise exc.UsageError("No such command 'quantise'.")

    monkeypatch.setattr(cli, "_register_pass_commands", lambda: None)
    monkeypatch.setattr(cli, "app", raise_usage)
    monkeypatch.setattr(sys, "argv", ["compress", "quantise"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.strip() == "Error: No such command 'quantise'.", err
