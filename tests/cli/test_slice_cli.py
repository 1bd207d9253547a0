"""`compress slice`: flags render; bad inputs → one line, exit 2, input untouched, no output; a
good run writes the per-layer report and `compress plan` accounts for the shortcuts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import SMOKE, assert_refused, dir_hash, run_cli


def test_help_shows_the_pass_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["slice", "--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--sparsity", "--schedule", "--round-to", "--slice-head", "--damp"):
        assert flag in out, flag


def _file(tmp_path: Path, body: str, name: str = "sched.yaml") -> str:
    p = tmp_path / name
    p.write_text(body)
    return str(p)


CASES = [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--schedule", "FILE:- 0.1\n- 0.2\n"], "3 blocks"),
    (["--schedule", "FILE:- 0.1\n- 0.2\n- 1.0\n"], "less than 1"),
    (["--schedule", "FILE:a: 1\n"], "list of fractions"),
    (["--schedule", "{tmp}/missing.yaml"], "does not exist"),
    (["--sparsity", "0.2", "--schedule", "FILE:- 0.1\n- 0.2\n- 0.3\n"], "either sparsity or schedule"),
    (["--round-to", "0"], "round"),
    (["--target", "mlp"], "cannot select a subset"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_slice_inputs(args: list[str], needle: str, tiny_llama: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    resolved = [(_file(tmp_path, a[5:]) if a.startswith("FILE:") else a.replace("{tmp}", str(tmp_path)))
                for a in args]
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(["slice", str(tiny_llama), "-o", str(out), *SMOKE, *resolved], monkeypatch, capsys)
    assert_refused(code, err, needle, tiny_llama, before, out)


def test_post_norm_encoder_is_refused(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    before = dir_hash(tiny_bert)
    out = tmp_path / "out"
    code, _, err = run_cli(["slice", str(tiny_bert), "--sparsity", "0.25", "-o", str(out), *SMOKE],
                           monkeypatch, capsys)
    assert code == 2 and "post-norm" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert dir_hash(tiny_bert) == before


def test_slice_writes_a_per_layer_report(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    code, stdout, err = run_cli(["slice", str(tiny_llama), "--sparsity", "0.25", "-o", str(out), *SMOKE],
                                monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "reports" / "report.csv").open()))
    blocks = [r for r in rows if r["layer"] not in ("-1", "")]
    assert len(blocks) == 2 * 3  # attention half and MLP half of each of the 3 blocks
    assert all(0.0 <= float(r["error"]) < 1.0 for r in blocks)
    extras = [json.loads(r["extra"]) for r in blocks]
    assert all(e["out_width"] == 48 and 0.0 < e["explained_variance"] <= 1.0 for e in extras[:-1])
    assert all(float(r["time_s"]) >= 0 for r in blocks)
