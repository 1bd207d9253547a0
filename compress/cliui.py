"""What the command line prints: progress (a bar with an ETA on a terminal, plain ``progress:``
lines when piped), the summary of a written output, the evaluation table, which exception
classes are typer/click usage errors, how every exception becomes an exit code (:func:`run_app`)
and how ``--device`` / ``--device-map`` combine. ``cli.py`` wires these to the commands."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn)

from compress.errors import CompressError
from compress.units import human_bytes, human_seconds

console = Console(stderr=True)
out_console = Console()


def progress_seconds() -> float:
    """Seconds between plain progress lines: ``$COMPRESS_PROGRESS_SECONDS`` (default 10)."""
    try:
        return max(0.0, float(os.environ.get("COMPRESS_PROGRESS_SECONDS", "10")))
    except ValueError:
        raise CompressError(f"COMPRESS_PROGRESS_SECONDS={os.environ['COMPRESS_PROGRESS_SECONDS']!r} is not a number",
                            "set it to seconds between progress lines, e.g. 10") from None


PROGRESS_PREFIX = "progress: "
"""Starts every plain (piped) progress line, so logs and scripts can tell them from results."""


class Steps:
    """Progress of long steps: a rich bar with the ETA on a terminal, plain lines when piped
    (at most one per ``every`` seconds, none in a job's first ``every`` seconds, so short runs
    and early refusals print only their result)."""

    def __init__(self, every: float | None = None) -> None:
        self.tty = console.is_terminal
        self.every = every if every is not None else progress_seconds()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=console, transient=True) if self.tty else None
        self.tasks: dict[str, tuple[Any, float, int]] = {}  # stem -> (task id, start, last i)
        self.mark = self.started = time.monotonic()  # latest update: when the next step began
        self.last_line = self.mark

    def __enter__(self) -> Steps:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, i: int, n: int, desc: str) -> None:
        stem = desc.split(" (", 1)[0]
        now = time.monotonic()
        task, start, last = self.tasks.get(stem, (None, self.mark, -1))
        if task is None or i <= last:  # a new step (or the same pass again in a later stage)
            task = self.bar.add_task(stem, total=n) if self.bar is not None else stem
            start = self.mark  # the step began when the previous update (or the run) did
        self.tasks[stem] = (task, start, i)
        self.mark = now
        if self.bar is not None:
            self.bar.update(task, completed=i, total=n, description=desc)
        elif now - self.last_line >= self.every or (i == n and self.last_line > self.started):
            self.last_line = now
            took = now - start
            eta = "" if i >= n or i == 0 else f", ETA {human_seconds(took / i * (n - i))}"
            console.print(f"{PROGRESS_PREFIX}{desc}: {i}/{n}, {human_seconds(took)}{eta}",
                          highlight=False, soft_wrap=True)


def wrote_line(out: Path, src: Path, seconds: float) -> str:
    """``wrote OUT`` and, indented below (so it fits 80 columns whatever the path), ``91.3 MiB
    (0.18× of 513.1 MiB), 4.25 bits/param in compressed linears, 3m12s``."""
    from compress.checkpoint import CheckpointReader
    from compress.eval import compressed_size

    reader, dense = CheckpointReader(out), CheckpointReader(src)
    size, ref = reader.total_bytes(), dense.total_bytes()
    bits, _ = compressed_size(reader, reader.manifest() or {})
    parts = [f"{human_bytes(size)} ({size / ref:.2f}× of {human_bytes(ref)})" if ref else human_bytes(size)]
    if bits is not None:
        parts.append(f"{bits:.2f} bits/param in compressed linears")
    parts.append(human_seconds(seconds))
    return f"[green]wrote[/green] {out}\n  " + ", ".join(parts)


def output_notes(manifest: dict) -> list[str]:
    """What a user must know about an output: the group size chosen for them, and where it loads."""
    lines = []
    group = (manifest.get("notes") or {}).get("group_size")
    if group and group.get("requested") == "auto":
        gs = group.get("group_size")
        lines.append(f"group size: auto → {gs if gs is not None else 'per channel'}")
    export = manifest.get("export") or {}
    kinds = {e.get("kind") for e in manifest.get("modules", {}).values()}
    if "quant" in kinds:
        if export.get("compressed_tensors"):
            lines.append("loads in: compress.load, and transformers with compressed-tensors installed")
        else:
            lines.append(f"loads in: compress.load only: {export.get('reason')}")
    elif "transformed-input" in kinds:
        dense = ((manifest.get("notes") or {}).get("flatquant") or {}).get("dense_sites")
        if dense:
            lines.append(f"no Kronecker factorisation for {', '.join(dense)}: a dense transform is used there")
        lines.append("loads in: compress.load only: online transforms and quantised activations have no "
                     "compressed-tensors format")
    elif "pruned" in kinds:
        plain = ((manifest.get("notes") or {}).get("structprune") or {}).get("plain_transformers")
        lines.append("loads in: compress.load, and plain transformers (every block has the same widths)" if plain
                     else "loads in: compress.load only: the blocks' widths differ")
    return lines


def print_eval(res) -> None:  # noqa: ANN001
    from rich.table import Table

    if hasattr(res, "cosine_mean"):  # an encoder: sentence-embedding fidelity
        from compress.eval_encoder import encoder_table

        out_console.print(encoder_table(res))
        return

    t = Table(title=f"evaluation ({res.protocol}, {res.eval_windows} windows, token perplexity)")
    t.add_column("metric")
    t.add_column("value", justify="right")

    def opt(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    rows = [("PPL", f"{res.ppl:.3f}"), ("dense PPL", opt(res.dense_ppl, ".3f")),
            ("size on disk", f"{human_bytes(res.bytes_on_disk)} ({res.bytes_on_disk:,} B)"),
            ("dense size on disk", "—" if res.dense_bytes_on_disk is None
             else f"{human_bytes(res.dense_bytes_on_disk)} ({res.dense_bytes_on_disk:,} B)"),
            ("bits/param (compressed linears)", opt(res.effective_bits, ".3f")),
            ("mean KL(dense‖compressed)", opt(res.kl_mean, ".4f")),
            ("top-1 agreement", opt(res.top1_agreement, ".4f")),
            ("eval windows", str(res.eval_windows)), ("eval tokens", str(res.eval_tokens))]
    for r in rows:
        t.add_row(*r)
    out_console.print(t)


def usage_error_classes() -> tuple[type[BaseException], ...]:
    """The ``ClickException`` classes the installed typer can raise: typer ≥ 0.29 vendors click
    as ``typer._click``; older typer raises the separate ``click`` package's exceptions."""
    import importlib

    classes: list[type[BaseException]] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), "ClickException", None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    # whatever typer re-exports as BadParameter, walked up to its ClickException base
    for cls in getattr(typer.BadParameter, "__mro__", ()):
        if cls.__name__ == "ClickException" and cls not in classes:
            classes.append(cls)
    return tuple(classes)


def eval_json_target(json_path: Path | None, mdir: Path, name: str) -> Path | None:
    """Where ``eval`` writes its JSON: ``--json`` (checked writable now, before the evaluation),
    else ``eval-<protocol>.json`` in a compress output that is writable, else nowhere."""
    from compress.checkpoint import ensure_writable

    if json_path is not None:
        check_json_writable(json_path)
        return json_path
    if not (mdir / "compression.json").is_file():
        return None
    try:
        ensure_writable(mdir, "the results")
    except CompressError:
        return None
    return mdir / f"eval-{name}.json"


def write_json(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def check_json_writable(json_path: Path | None) -> None:
    """Refuse an unwritable ``--json`` now, not after minutes of work."""
    if json_path is not None:
        from compress.checkpoint import ensure_writable

        ensure_writable(json_path.parent, f"--json {json_path}")


def device_placement(device: str | None, device_map: str | None) -> tuple[str | None, str | None]:
    """``--device`` / ``--device-map`` as ``(device, device_map)``: at most one of them is given
    (neither: ``--device auto``); the device is resolved, the map's strategy checked."""
    if device is not None and device_map is not None:
        raise CompressError(f"--device {device} and --device-map {device_map} were both given",
                            "pass one: --device for one device, --device-map to spread the model")
    if device_map is not None:
        from compress.placement import STRATEGIES

        if device_map not in STRATEGIES:
            raise CompressError(f"unknown --device-map {device_map!r}", "use auto, balanced or sequential")
        return None, device_map
    from compress.device import device_name

    return device_name(device or "auto"), None


#: OSError numbers that are the environment (permissions, read-only or full disks), not a bug
FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def run_app(app: typer.Typer) -> None:
    """Run the Typer ``app`` as the console entry point: one line and exit code 2 for user errors
    (``CompressError``, a bad recipe value, a usage error, an unwritable or full disk), 130 for
    Ctrl-C, no tracebacks for anything the user can fix."""
    from pydantic import ValidationError

    usage_errors = usage_error_classes()
    try:
        rv = app(standalone_mode=False)  # Typer returns exit codes (Ctrl-C → 130) in this mode
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                console.print("[red]interrupted[/red]: no output was written")
            sys.exit(rv)
    except CompressError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ValidationError as e:
        err = e.errors()[0]
        console.print(f"[red]error:[/red] {'.'.join(map(str, err['loc']))}: {err['msg']}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: no output was written")
        sys.exit(130)
    except OSError as e:  # the environment, not a bug: permissions, read-only or full disks
        if e.errno not in FS_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        console.print(f"[red]error:[/red] {e.strerror}{where} — free space or choose a writable location; "
                      "no output was written", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except usage_errors as e:  # usage errors arrive here in non-standalone mode
        e.show()  # usage line + "Error: ..." (bare `compress`: the help text)
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:
        # an abort/exit class of the other click flavour (e.g. click.exceptions.Abort)
        name = type(e).__name__ if type(e).__module__.split(".")[0] in ("click", "typer") else ""
        if name == "Abort":
            console.print("[red]aborted[/red]")
            sys.exit(130)
        if name == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            sys.exit(e.exit_code)
        raise
