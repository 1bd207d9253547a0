"""The command line as a user meets it (issue 9): the installed ``compress`` console script run
in a subprocess, one test per finding — data refusal, filesystem errors, ``--overwrite`` safety,
progress, 80-column output, one option vocabulary, errors in the user's terms, the success
summary, ``plan`` output and the protocol docs."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dir_hash, error_lines, make_llama

SCRIPT = Path(sys.executable).parent / "compress"
SMOKE = ["--protocol", "brown-128-smoke", "--batch-size", "4"]
ROOT = Path(__file__).resolve().parents[2]


def compress(*args: str, cwd: Path | None = None, columns: int = 80, env: dict | None = None,
             prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the console script as a user does (piped, ``COLUMNS`` wide)."""
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": str(columns), **(env or {})}
    return subprocess.run([*(prefix or []), str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)


def refused(p: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, one error line containing ``needle``, no traceback."""
    both = p.stdout + p.stderr
    assert p.returncode == 2, both
    assert "Traceback" not in both, both
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), p.stderr


def narrow(text: str, width: int = 80, paths: tuple[Path, ...] = ()) -> None:
    """Every line fits ``width`` columns and no cell was cut short (the user's own ``paths``,
    which no layout can shorten, count as four characters)."""
    for path in sorted(map(str, paths), key=len, reverse=True):
        text = text.replace(path, "PATH")
    long = [ln for ln in text.splitlines() if len(ln) > width]
    assert not long, "\n".join(long)
    assert "…" not in text, text


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("ux") / "llama")


@pytest.fixture(scope="module")
def quantized(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("uxq") / "w4"
    p = compress("quantize", str(llama), "--bits", "4", "-o", str(out), *SMOKE)
    assert p.returncode == 0, p.stderr
    return out, p


def _readonly(directory: Path) -> list[str] | None:
    """A command prefix under which ``directory`` is read-only: plain permissions for a normal
    user; a read-only bind mount in a private namespace for root (who ignores permissions)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {directory} {directory} && "
                            f"mount -o remount,ro,bind {directory} && ! touch {directory}/.probe"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    d = str(directory)
    return ["unshare", "-rm", "sh", "-c", f'mount --bind {d} {d} && mount -o remount,ro,bind {d} {d} && exec "$@"',
            "sh"]


# 1. bad data -----------------------------------------------------------------------------
def test_binary_and_nul_corpora_are_refused(llama: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(os.urandom(64 * 1024))
    before = dir_hash(llama)
    refused(compress("gptq", str(llama), "--data", str(garbage), "-o", str(tmp_path / "o"), *SMOKE), "utf-8")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a real line of text\n" * 200 + b"\x00\x00\x00\n")
    refused(compress("gptq", str(llama), "--data", str(nul), "-o", str(tmp_path / "o"), *SMOKE), "nul")
    refused(compress("gptq", str(llama), "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")),
            "--data")
    assert not (tmp_path / "o").exists() and dir_hash(llama) == before


def test_data_free_commands_have_no_calibration_options(llama: Path, tmp_path: Path) -> None:
    help_ = compress("rtn", "-h").stdout
    for flag in ("--data", "--protocol", "--n-samples", "--seq-len", "--batch-size"):
        assert flag not in help_, flag
    p = compress("rtn", str(llama), "--data", "/nonexistent.txt", "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and "--data" in p.stderr and "Traceback" not in p.stderr
    refused(compress("quantize", str(llama), "--method", "rtn", "--n-samples", "4", "-o", str(tmp_path / "o")),
            "data-free")
    out = tmp_path / "rtn"
    assert compress("rtn", str(llama), "-o", str(out)).returncode == 0
    recipe = (out / "recipe.yaml").read_text()
    assert "calibration" not in recipe and "protocol" not in recipe and "brown" not in recipe, recipe
    assert json.loads((out / "compression.json").read_text())["calibration"] is None


# 2. filesystem errors --------------------------------------------------------------------
def test_read_only_output_parent_is_one_line(llama: Path, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    prefix = _readonly(parent)
    if prefix is None:
        pytest.skip("cannot make a read-only directory here (root without user namespaces)")
    try:
        refused(compress("rtn", str(llama), "-o", str(parent / "out"), prefix=prefix), "cannot write")
    finally:
        parent.chmod(0o755)
    assert not (parent / "out").exists()


def test_eval_json_goes_where_asked_and_is_checked_first(quantized: tuple[Path, object], llama: Path,
                                                         tmp_path: Path) -> None:
    out, _ = quantized
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _readonly(ro)
    if prefix is not None:  # an unwritable --json target: refused before the evaluation
        try:
            p = compress("eval", str(out), *SMOKE[:2], "--json", str(ro / "e.json"), prefix=prefix)
        finally:
            ro.chmod(0o755)
        refused(p, "--json")
        assert "PPL" not in p.stdout  # nothing was evaluated
    p = compress("eval", str(llama), *SMOKE[:2], cwd=tmp_path)  # a dense model: no JSON, and says so
    assert p.returncode == 0 and "--json" in p.stderr, p.stderr
    assert not list(tmp_path.glob("eval-*.json")) and not list(llama.glob("eval-*.json"))
    p = compress("eval", str(out), *SMOKE[:2], "--json", str(tmp_path / "res" / "e.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "res" / "e.json").read_text())["protocol"] == "brown-128-smoke"


def test_eval_on_a_read_only_output_still_reports(quantized: tuple[Path, object], tmp_path: Path) -> None:
    out = shutil.copytree(quantized[0], tmp_path / "ro-model")
    prefix = _readonly(out)
    if prefix is None:
        pytest.skip("cannot make a read-only directory here")
    try:
        p = compress("eval", str(out), *SMOKE[:2], prefix=prefix)
    finally:
        out.chmod(0o755)
    assert p.returncode == 0 and "PPL" in p.stdout and "--json" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# 3. --overwrite safety -------------------------------------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_ours(llama: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    before = dir_hash(mine)
    refused(compress("rtn", str(llama), "-o", str(mine), "--overwrite"), "--force")
    assert dir_hash(mine) == before
    assert compress("rtn", str(llama), "-o", str(mine), "--force").returncode == 0
    assert (mine / "compression.json").is_file() and not (mine / "notes.txt").exists()
    assert compress("rtn", str(llama), "-o", str(mine), "--overwrite").returncode == 0  # ours now


# 4. progress -----------------------------------------------------------------------------
def test_piped_progress_is_plain_lines_with_an_eta(quantized: tuple[Path, object]) -> None:
    p = compress("eval", str(quantized[0]), *SMOKE[:2], env={"COMPRESS_PROGRESS_SECONDS": "0"})
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("progress: ")]
    assert p.returncode == 0 and len(lines) >= 2, p.stderr
    assert "ETA" in lines[0] and "\x1b" not in p.stderr, p.stderr


def test_terminal_progress_is_a_bar_with_an_eta(quantized: tuple[Path, object], tmp_path: Path) -> None:
    if not SCRIPT.exists():
        pytest.skip("console script not installed")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal on stdout and stderr
        os.environ.update({"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
        os.execv(str(SCRIPT), [str(SCRIPT), "eval", str(quantized[0]), *SMOKE[:2], "--json",
                               str(tmp_path / "e.json")])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "ETA" in text and "eval brown-128-smoke" in text and "progress: " not in text, text


# 5. tables at 80 columns -----------------------------------------------------------------
def test_quantize_output_fits_80_columns_and_shows_the_worst(
        quantized: tuple[Path, subprocess.CompletedProcess], llama: Path) -> None:
    out, p = quantized
    narrow(p.stdout + p.stderr, paths=(out, llama))
    names = re.findall(r"^(L\d+ \S+)", p.stderr, flags=re.M)
    assert len(set(names)) == len(names) >= 4, p.stderr  # q/k/v/o distinguishable
    assert {"self_attn.q", "self_attn.k"} <= {n.split()[1] for n in names}, p.stderr
    errors = [float(x) for x in re.findall(r"^L\d+ \S+\s+quant\s+\S+\s+(\S+)", p.stderr, flags=re.M)]
    assert errors == sorted(errors, reverse=True), p.stderr  # worst first
    csv_rows = (out / "reports" / "report.csv").read_text().strip().splitlines()[1:]
    assert len(csv_rows) >= len(names)  # the CSV has every row


def test_rtn_report_shows_weight_error(llama: Path, tmp_path: Path) -> None:
    p = compress("rtn", str(llama), "--bits", "3", "-o", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    narrow(p.stderr, paths=(tmp_path / "r", llama))
    assert "rel. W err" in p.stderr, p.stderr
    rows = re.findall(r"^L\d+ \S+\s+quant\s+\S+\s+(\S+)", p.stderr, flags=re.M)
    assert rows and all(float(x) > 0 for x in rows), p.stderr
    records = json.loads((tmp_path / "r" / "reports" / "report.json").read_text())
    assert all(r["weight_error"] > 0 for r in records if r["kind"] == "quant")


def test_validate_fits_80_columns_and_lists_failures_only(quantized: tuple[Path, object]) -> None:
    p = compress("validate", str(quantized[0]), "--m", "1", "--m", "17")
    assert p.returncode == 0, p.stdout + p.stderr
    narrow(p.stdout + p.stderr)
    assert "self_attn.q" not in p.stdout  # no failures: only the per-kind summary
    assert "quant" in p.stdout
    v = compress("validate", str(quantized[0]), "--m", "1", "--verbose")
    assert v.returncode == 0
    narrow(v.stdout)
    assert "self_attn.q" in v.stdout and "self_attn.k" in v.stdout


# 6. one vocabulary -----------------------------------------------------------------------
COMMANDS = ["quantize", "rtn", "gptq", "lowrank", "slice", "run", "eval", "list", "inspect", "plan",
            "assets", "demo", "validate", "bench", "generate"]


def test_version_help_and_bare_invocation() -> None:
    v = compress("--version")
    assert v.returncode == 0 and re.fullmatch(r"compress \d+\.\d+\.\d+\S*", v.stdout.strip()), v.stdout
    for args in (["-h"], ["--help"]):
        h = compress(*args)
        assert h.returncode == 0 and "Usage:" in h.stdout and "--install-completion" in h.stdout
    bare = compress()
    assert bare.returncode in (0, 2) and "Usage:" in bare.stdout + bare.stderr
    assert "Traceback" not in bare.stdout + bare.stderr


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_short_help_examples_and_real_help_text(cmd: str) -> None:
    p = compress(cmd, "-h")
    assert p.returncode == 0 and "Usage:" in p.stdout, p.stderr
    narrow(p.stdout)
    assert "Examples:" in p.stdout and f"compress {cmd}" in p.stdout.split("Examples:")[1]
    assert "<bool>" not in p.stdout
    if cmd in ("quantize", "rtn", "gptq"):  # one spelling of symmetric everywhere
        assert "--sym / --asym" in p.stdout and "--symmetric" not in p.stdout, cmd
    for line in p.stdout.split("Options:")[1].split("Examples:")[0].splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)( [^ ].*?)?\s{2,}(\S.*)$", line)
        if m:  # an option line with its help: the help says more than the flag's name
            words = m.group(2).lstrip("-").replace("-", " ")
            assert m.group(4).strip().lower() != words, line


def test_run_takes_calibration_overrides(llama: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - pass: gptq\n    config: {bits: 4}\n")
    out = tmp_path / "o"
    p = compress("run", str(recipe), str(llama), "-o", str(out), "--protocol", "brown-128-smoke",
                 "--n-samples", "4", "--batch-size", "2")
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "compression.json").read_text())["calibration"]["protocol"] == "brown-128-smoke-c4"


def test_protocols_assets_and_mistyped_names_are_discoverable(tmp_path: Path) -> None:
    p = compress("list", "--protocols")
    assert p.returncode == 0 and "brown-512" in p.stdout and "brown-128-smoke" in p.stdout
    narrow(p.stdout)
    a = compress("list", "--assets")
    assert a.returncode == 0 and "smollm2-135m" in a.stdout
    refused(compress("inspect", "smollm2-135", cwd=tmp_path), "did you mean smollm2-135m")
    narrow(compress("list").stdout)


# 7. errors in the user's terms -----------------------------------------------------------
def test_flag_errors_name_the_flag(llama: Path, tmp_path: Path) -> None:
    refused(compress("quantize", str(llama), "--bits", "5", "-o", str(tmp_path / "o")), "--bits 5")
    p = compress("quantize", str(llama), "--group-size", "-5", "-o", str(tmp_path / "o"))
    refused(p, "--group-size -5")
    assert "0 (per channel)" in p.stderr and "0 for per channel" in " ".join(compress("quantize", "-h").stdout.split())
    refused(compress("gptq", str(llama), "--protocol", "nope", "-o", str(tmp_path / "o")), "--protocol")
    refused(compress("quantize", str(llama), "--method", "rtn", "--damp", "0.1", "-o", str(tmp_path / "o")),
            "--damp")
    for line in error_lines(compress("quantize", str(llama), "--bits", "5", "-o", "x").stderr):
        assert "stages" not in line and "recipe" not in line, line


def test_recipe_errors_name_the_key_and_line(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nstages:\n  - pass: gptq\n    config:\n      group_size: 64\n      bits: 5\n")
    refused(compress("plan", str(bad), str(llama)), f"{bad}:6: stages[0].config.bits")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages:\n  - pass: gptq\n    config: {bits: 4\n")
    p = compress("run", str(broken), str(llama), "-o", str(tmp_path / "o"))
    refused(p, f"{broken}:")
    assert re.search(rf"{re.escape(str(broken))}:\d+", p.stderr), p.stderr


# 8. success and gate failure -------------------------------------------------------------
def test_success_says_what_was_written_and_what_next(quantized: tuple[Path, subprocess.CompletedProcess],
                                                     llama: Path) -> None:
    out, p = quantized
    lines = p.stderr.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("wrote "))
    assert lines[at] == f"wrote {out}", lines[at]
    summary = lines[at + 1]
    assert "bits/param" in summary and "KiB" in summary and re.search(r"\d s|\dm\d", summary), summary
    assert f"next: compress eval {out} --against {llama}" in p.stderr


def test_failed_gate_says_the_output_was_kept(llama: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "gated.yaml"
    recipe.write_text("stages:\n  - pass: rtn\n    config: {bits: 2, group_size: 32}\n"
                      "gates: {protocol: brown-128-smoke, max_kl: 1.0e-12}\n")
    out = tmp_path / "o"
    p = compress("run", str(recipe), str(llama), "-o", str(out))
    assert p.returncode == 1, p.stderr
    assert "gate failed" in p.stderr and f"kept at {out}" in p.stderr and (out / "compression.json").is_file()


# 9. plan ---------------------------------------------------------------------------------
def test_plan_shows_effective_options_in_human_units(llama: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - pass: rtn\n")
    p = compress("plan", str(recipe), str(llama))
    assert p.returncode == 0, p.stderr
    narrow(p.stdout)
    assert "{}" not in p.stdout and "bits: 4" in p.stdout and "group_size" in p.stdout
    assert re.search(r"\d+\.\d (KiB|MiB|GiB)", p.stdout) and not re.search(r"\d{1,3}(,\d{3}){2,}", p.stdout)
    assert "data-free" in p.stdout


# 10. the protocol lives in the project ---------------------------------------------------
def test_readme_points_at_the_projects_own_protocol_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "docs/PROTOCOL.md" in readme
    assert "brown-512" in (ROOT / "docs" / "PROTOCOL.md").read_text()


def test_every_help_example_parses() -> None:
    """The examples in the help are real command lines: each parses against its command (flags
    exist, values have the right types); a renamed option cannot leave a stale example."""
    import shlex

    import typer

    import cli

    cli._register_pass_commands()
    group = typer.main.get_command(cli.app)
    seen = 0
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for line in (cmd.epilog or "").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            if words[:2] != ["compress", name]:
                continue
            ctx = cmd.make_context(name, words[2:], resilient_parsing=False)
            ctx.close()
            seen += 1
    assert seen >= 2 * len(COMMANDS) - 4, seen


def test_a_full_disk_while_storing_statistics_is_one_line(tmp_path: Path) -> None:
    """``ulimit -f`` below one block's Gram matrices: the work store's write fails, the run stops
    with one line and exit 2, and neither an output nor a partial directory is left."""
    model = make_llama(tmp_path / "llama", layers=2)
    out = tmp_path / "o"
    before = dir_hash(model)
    from compress.assets import brown_corpus_path

    corpus = brown_corpus_path().parent  # found (or fetched) here, outside the file-size limit
    p = compress("gptq", str(model), "-o", str(out), "--propagate", "dense", *SMOKE,
                 env={"COMPRESS_CACHE": str(tmp_path / "cache"), "COMPRESS_DATA_DIR": str(corpus)},
                 prefix=["bash", "-c", 'ulimit -f 120; exec "$@"', "bash"])
    refused(p, "cannot write")
    assert not out.exists() and not out.with_name("o.partial").exists() and dir_hash(model) == before
