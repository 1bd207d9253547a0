"""Protocol names tell the truth (issue 8, item 7): a protocol applied to another corpus is named
after it (``other.txt`` → ``other-…``) and a reduced calibration carries ``-c<N>`` / ``-s<L>``,
everywhere the protocol is recorded (eval title, eval JSON and its file name, compression.json
``calibration.protocol`` and ``notes.calibration.protocol``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.calib.protocol import corpus_protocol_name
from compress.recipe import CalibrationConfig
from compress.runner import make_protocol
from tests.conftest import brown_lines, run_cli


@pytest.mark.parametrize("name, data, expected", [
    ("brown-512", None, "brown-512"),
    ("brown-512-smoke", "brown", "brown-512-smoke"),
    ("brown-512", "/x/other.txt", "other-512"),
    ("brown-512-smoke", "other.jsonl", "other-512-smoke"),
    ("brown-512-c32", "/x/other.txt", "other-512-c32"),
    ("brown-sentences-512", "my notes.txt", "my-notes-sentences-512"),
    ("brown-512", "/nowhere/brown.txt", "file-brown-512"),  # named brown, but not the brown corpus
])
def test_corpus_protocol_name(name: str, data: str | None, expected: str) -> None:
    assert corpus_protocol_name(name, data) == expected


def test_the_brown_corpus_by_path_keeps_its_name() -> None:
    from compress.assets import brown_corpus_path

    assert corpus_protocol_name("brown-512", str(brown_corpus_path())) == "brown-512"


@pytest.mark.parametrize("kw, expected", [
    ({}, "brown-512"),
    ({"n_samples": 128}, "brown-512"),  # the protocol's own count: not a reduction
    ({"n_samples": 32}, "brown-512-c32"),
    ({"seq_len": 256}, "brown-512-s256"),
    ({"n_samples": 32, "seq_len": 256}, "brown-512-c32-s256"),
])
def test_reduced_calibration_gets_its_own_name(kw: dict, expected: str) -> None:
    proto = make_protocol(CalibrationConfig(**kw))
    assert proto.name == expected
    if "n_samples" in kw:
        assert proto.n_calib == kw["n_samples"]
    if "seq_len" in kw:
        assert proto.seq_len == kw["seq_len"]


@pytest.fixture(scope="module")
def other_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short user corpus (brown lines, but not *the* brown corpus file): enough test lines
    for fewer evaluation windows than brown-128-smoke's 4."""
    path = tmp_path_factory.mktemp("data") / "other.txt"
    path.write_text("\n".join(brown_lines(60)) + "\n")
    return path


def test_eval_on_other_text_is_named_after_it(tiny_llama: Path, other_txt: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    from compress.calib.protocol import get_protocol
    from compress.eval import eval_token_windows

    out = tmp_path / "rtn"  # a compress output: the JSON lands in it, named after the data
    code, _, err = run_cli(["rtn", str(tiny_llama), "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["eval", str(out), "--protocol", "brown-128-smoke",
                                 "--data", str(other_txt)], monkeypatch, capsys)
    assert code == 0, err
    windows = eval_token_windows(tiny_llama, "brown-128-smoke", str(other_txt)).shape[0]
    assert 1 <= windows < get_protocol("brown-128-smoke").n_eval  # a short text: fewer windows
    assert f"other-128-smoke, {windows} windows" in stdout and "brown" not in stdout
    assert not (out / "eval-brown-128-smoke.json").exists()
    res = json.loads((out / "eval-other-128-smoke.json").read_text())
    assert res["protocol"] == "other-128-smoke" and res["eval_windows"] == windows
    assert res["eval_tokens"] == windows * 127 and res["data"] == str(other_txt.resolve())


def test_eval_on_brown_keeps_the_name(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # a dense input is not a compress output: nothing lands in cwd
    code, stdout, err = run_cli(["eval", str(tiny_llama), "--protocol", "brown-128-smoke"], monkeypatch, capsys)
    assert code == 0, err
    assert not list(tmp_path.iterdir()) and "pass --json" in err
    code, stdout, err = run_cli(["eval", str(tiny_llama), "--protocol", "brown-128-smoke",
                                 "--json", str(tmp_path / "e.json")], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["protocol"] == "brown-128-smoke" and res["eval_windows"] == 4 and res["data"] == "brown"
    assert "brown-128-smoke, 4 windows" in stdout


@pytest.mark.parametrize("extra, expected", [
    ([], "other-128-smoke"),
    (["--n-samples", "4"], "other-128-smoke-c4"),
])
def test_calibration_on_other_text_is_recorded_under_its_name(
        extra: list[str], expected: str, tiny_llama: Path, other_txt: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q"
    code, _, err = run_cli(["gptq", str(tiny_llama), "--bits", "4", "--group-size", "32", "-o", str(out),
                            "--data", str(other_txt), "--protocol", "brown-128-smoke", "--batch-size", "4",
                            *extra], monkeypatch, capsys)
    assert code == 0, err
    meta = json.loads((out / "compression.json").read_text())
    assert meta["calibration"]["protocol"] == expected
    assert meta["calibration"]["source"] == str(other_txt.resolve())
    assert meta["notes"]["calibration"]["protocol"] == expected
    n = 4 if extra else 8
    assert meta["calibration"]["windows"][0] == n and meta["notes"]["calibration"]["windows"][0] == n


def test_encoder_eval_on_other_text_is_named_after_it(tiny_bert: Path, other_txt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    code, stdout, err = run_cli(["eval", str(tiny_bert), "--protocol", "brown-128-smoke",
                                 "--data", str(other_txt), "--json", str(tmp_path / "e.json")], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["protocol"] == "other-sentences-64-smoke" and res["sentences"] == 6  # 60 lines: 6 test lines
    assert "other-sentences-64-smoke, 6 sentences" in stdout and "brown" not in stdout
