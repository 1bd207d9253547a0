"""The ``compress`` command line: thin wrappers that build a Recipe and call the library.

Per-pass subcommands (``compress gptq``, ``compress rtn``, ...) and ``compress quantize`` are
generated from the pass registry, their options from the typed configs (:mod:`compress.cliopts`),
so every command speaks one vocabulary. User errors print one line and exit with code 2 (before
any work where they can be detected); gate and validation failures exit with code 1.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from compress import cliopts
from compress.cliui import (
    Steps, check_json_writable, console, device_placement, eval_json_target, out_console, output_notes, print_eval,
    run_app, write_json, wrote_line)
from compress.errors import CompressError
from compress.pipeline.pass_api import PassConfig
from compress.recipe import CalibrationConfig, Recipe
from compress.registry import PassSpec

app = typer.Typer(
    add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Make transformer checkpoints smaller and faster: quantize, slice, factor; evaluate, "
         "validate and serve the result. `compress COMMAND -h` shows a command's options and examples.")

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Hugging Face checkpoint directory or named asset (smollm2-135m, minilm-l6)")]
OutOpt = Annotated[Path, typer.Option("--output", "-o", metavar="DIR",
                                      help="output directory (written atomically: nothing appears on failure)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing compress output")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace the output directory even if it is not a "
                                                        "compress output (deletes its contents)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue a killed run of the same command from its "
                                                          "last finished block (OUT.partial)")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="neither read nor write the work store of scan "
                                                             "statistics ($COMPRESS_CACHE/work)")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="random seed [default: 0]", show_default=False)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help="also write the results as JSON here")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda[:N]", show_default=False,
                                        help="where to compute (auto: CUDA when present) [default: auto]")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="run the Python code a checkpoint ships "
                                                                   "(auto_map); off by default")]
Activations = Enum("Activations", {m: m for m in ("auto", "device", "host")}, type=str)  # type: ignore[misc]
ActivationsOpt = Annotated[Activations, typer.Option(
    "--activations", metavar="auto|device|host", show_default=False, case_sensitive=False,
    help="where calibration activations live (auto: on the device if they fit, else on the host, moved per "
         "batch) [default: auto]")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", metavar="auto|balanced|sequential", show_default=False,
    help="spread the model over the GPUs, CPU memory and disk with accelerate (instead of --device)")]

CALIB_FLAGS = cliopts.flags_for(CalibrationConfig, skip=(), defaults={"data": "the brown corpus"})
EVAL_PROTOCOL = next(f for f in CALIB_FLAGS if f.field == "protocol")


def _examples(*lines: str) -> str:
    """A help epilog; ``\b`` keeps click from re-wrapping the command lines."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {ln}" for ln in lines)


# -- progress ------------------------------------------------------------------------------
# -- running a recipe ----------------------------------------------------------------------
def _execute(recipe: Recipe, model: str, output: Path, overwrite: bool, force: bool, *,
             cache: bool = True, resume: bool = False, device: str = "auto", activations: str = "auto",
             trust_remote_code: bool = False) -> Path:
    from compress.assets import resolve_model
    from compress.report import print_table, read_json
    from compress.distributed import world
    from compress.runner import run_recipe

    _trust(trust_remote_code)
    src = resolve_model(model)
    t0 = time.perf_counter()
    with Steps() as steps:
        out = run_recipe(recipe, src, output, overwrite=overwrite, force=force, progress=steps,
                         cache=cache, resume=resume, device=device, activations=activations)
    if not world().main:  # a data-parallel run: process 0 reports
        return out
    report = out / "reports" / "report.json"
    if report.is_file():
        print_table(read_json(report), console, title=f"{out.name}: per-layer report",
                    csv_hint=f"{out.name}/reports/report.csv")
    manifest = json.loads((out / "compression.json").read_text())
    console.print(wrote_line(out, src, time.perf_counter() - t0), highlight=False, soft_wrap=True)
    for line in output_notes(manifest):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"next: compress eval {out} --against {model}", highlight=False, soft_wrap=True)
    return out


def _calibration(kw: dict[str, Any], command: str, *, base: CalibrationConfig | None = None) -> CalibrationConfig:
    """The calibration options typed on the command line, validated in their flags' terms."""
    typed = cliopts.given(CALIB_FLAGS, kw)
    data = typed.get("data")
    if data not in (None, "brown") and not Path(data).is_file():
        raise CompressError(f"--data {data}: {'is a directory' if Path(data).is_dir() else 'no such file'}",
                            "pass a UTF-8 text or JSONL file (or leave --data out for the brown corpus)")
    values = {**(base.model_dump(exclude_none=True) if base else {}), **typed}
    return cliopts.validate(CalibrationConfig, values, CALIB_FLAGS, command)  # type: ignore[return-value]


def _refuse_calibration(kw: dict[str, Any], what: str) -> None:
    """A data-free job takes no calibration options: say so instead of recording unused ones."""
    typed = [f.name for f in CALIB_FLAGS if kw.get(f.field) is not None]
    if typed:
        raise CompressError(f"{typed[0]}: {what} is data-free and reads no calibration data",
                            f"drop {', '.join(typed)}")


def _recipe(name: str, stages: list[tuple[str, PassConfig]], calib: CalibrationConfig, seed: int) -> Recipe:
    from compress.recipe import Stage

    return Recipe(name=name, seed=seed, calibration=calib,
                  stages=[Stage(**{"pass": p, "config": c}) for p, c in stages])


def _params(*groups: list[inspect.Parameter]) -> inspect.Signature:
    """One signature from parameter groups; a name defined twice is a registry bug."""
    params = [p for g in groups for p in g]
    names = [p.name for p in params]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TypeError(f"command option defined twice: {sorted(dup)}")
    return inspect.Signature(params)


def _p(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _head_params() -> list[inspect.Parameter]:
    return [_p("model", ModelArg), _p("output", OutOpt), _p("overwrite", OverwriteOpt, False),
            _p("force", ForceOpt, False), _p("resume", ResumeOpt, False), _p("no_cache", NoCacheOpt, False),
            _p("device", DeviceOpt, "auto"), _p("activations", ActivationsOpt, Activations.auto),
            _p("trust_remote_code", TrustOpt, False)]


def _run_flags(kw: dict[str, Any]) -> dict[str, Any]:
    return {"cache": not kw["no_cache"], "resume": kw["resume"], "device": kw["device"],
            "activations": kw["activations"].value, "trust_remote_code": kw["trust_remote_code"]}


def _trust(on: bool) -> None:
    """``--trust-remote-code``: let this command (and the processes it starts) run a checkpoint's code."""
    if on:
        from compress.arch import REMOTE_CODE_ENV

        os.environ[REMOTE_CODE_ENV] = "1"


# -- generated per-pass commands ------------------------------------------------------------
def make_pass_command(spec: PassSpec) -> Any:
    """A command whose options are the pass config's fields; a pass that can read calibration
    data also gets the calibration options, a data-free pass none."""
    flags = cliopts.flags_for(spec.config_cls)
    may_calibrate = spec.needs_calibration is not False
    command_name = spec.cli_name

    def command(**kw: Any) -> None:
        config = cliopts.validate(spec.config_cls, cliopts.given(flags, kw), flags, command_name)
        if may_calibrate and not spec.calibrates(config):  # e.g. lowrank --no-whiten
            _refuse_calibration(kw, f"{spec.name} with these options")
        calib = _calibration(kw, command_name) if may_calibrate else CalibrationConfig()
        recipe = _recipe(f"cli-{spec.name}", [(spec.name, config)], calib, kw["seed"])
        _execute(recipe, kw["model"], kw["output"], kw["overwrite"], kw["force"], **_run_flags(kw))

    command.__signature__ = _params(  # type: ignore[attr-defined]
        _head_params(), cliopts.parameters(flags), cliopts.parameters(CALIB_FLAGS) if may_calibrate else [],
        [_p("seed", SeedOpt, 0)])
    data = "Calibrates on the brown corpus unless --data is given." if spec.needs_calibration is True else (
        "Data-free: no calibration options." if spec.needs_calibration is False
        else "Whether it calibrates depends on its options.")
    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]}.\n\n{data} Options mirror the " \
                      f"`{spec.name}` recipe config (`compress run`)."
    return command


def _pass_examples(spec: PassSpec) -> str:
    lines = list(spec.examples) or [f"compress {spec.cli_name} smollm2-135m -o out/{spec.cli_name}"]
    return _examples(*lines)


def _quant_family() -> dict[str, PassSpec]:
    """The passes ``compress quantize --method`` chooses from (their configs are quant configs)."""
    from compress.passes.quantize import QuantConfig
    from compress.registry import all_passes

    return {n: s for n, s in all_passes().items() if issubclass(s.config_cls, QuantConfig)}


def make_quantize_command() -> Any:
    """``compress quantize``: one command over every quantisation pass (``--method``), with the
    union of their options; an option the chosen method does not have is refused by name."""
    family = _quant_family()
    union: dict[str, cliopts.Flag] = {}
    for spec in family.values():
        for fl in cliopts.flags_for(spec.config_cls):
            union.setdefault(fl.field, fl)
    flags = [_family_flag(fl, family) for fl in union.values()]
    methods = Enum("Method", {n: n for n in family}, type=str)  # type: ignore[misc]

    def command(**kw: Any) -> None:
        values = cliopts.given(flags, kw)
        method = kw["method"].value if kw["method"] is not None else cliopts.grid_method(values, family)
        spec = family[method]
        own = set(spec.config_cls.model_fields)
        foreign = [fl.name for fl in flags if fl.field in values and fl.field not in own]
        if foreign:
            field = next(fl.field for fl in flags if fl.name == foreign[0])
            users = [n for n, s in family.items() if field in s.config_cls.model_fields]
            raise CompressError(f"{foreign[0]} is not an option of --method {spec.name}",
                                f"drop it, or use --method {' or '.join(users)}")
        config = cliopts.validate(spec.config_cls, values, flags, "quantize")
        if not spec.calibrates(config):
            _refuse_calibration(kw, f"--method {spec.name}")
        calib = _calibration(kw, "quantize") if spec.calibrates(config) else CalibrationConfig()
        _execute(_recipe(f"cli-{spec.name}", [(spec.name, config)], calib, kw["seed"]),
                 kw["model"], kw["output"], kw["overwrite"], kw["force"], **_run_flags(kw))

    method_opt = Annotated[methods, typer.Option("--method", case_sensitive=False, metavar="|".join(family),
                                                 help="quantiser [default: gptq; nupes with --grid power]")]
    command.__signature__ = _params(  # type: ignore[attr-defined]
        _head_params(), [_p("method", method_opt, None)], cliopts.parameters(flags),
        cliopts.parameters(CALIB_FLAGS), [_p("seed", SeedOpt, 0)])
    command.__doc__ = ("Quantise every block linear of MODEL: GPTQ (default), RTN, NUPES' power grid (--grid power) or "
                       "FlatQuant W4A4 (--act-bits, --kv-bits). Calibration options apply to the calibrating methods.")
    return command


def _family_flag(fl: cliopts.Flag, family: dict[str, PassSpec]) -> cliopts.Flag:
    """``fl`` with help that says which methods have the option and where their defaults differ."""
    owners = {n: s for n, s in family.items() if fl.field in s.config_cls.model_fields}
    defaults = {n: s.config_cls.model_fields[fl.field].get_default(call_default_factory=True)
                for n, s in owners.items()}
    help_ = fl.help
    if len(set(map(repr, defaults.values()))) > 1:
        on, _, off = fl.decl.partition("/")
        text = ", ".join(f"{(on if v else off) if isinstance(v, bool) else v} for {n}" for n, v in defaults.items())
        help_ = help_[:help_.rindex("[default:")] + f"[default: {text}]"
    if len(owners) < len(family):
        help_ = f"({', '.join(owners)} only) {help_}"
    return cliopts.Flag(fl.field, fl.decl, help_, fl.metavar, fl.typ)


def _register_pass_commands() -> None:
    from compress.registry import all_passes

    known = {c.name for c in app.registered_commands}
    if "quantize" not in known:
        app.command("quantize", epilog=_examples(
            "compress quantize smollm2-135m --bits 4 -o out/w4",
            "compress quantize smollm2-135m --bits 3 --group-size 64 --asym -o out/w3",
            "compress quantize smollm2-135m --method rtn --bits 8 -o out/w8",
            "compress quantize MODEL --bits 4 --data my.txt --n-samples 64 -o OUT"))(make_quantize_command())
    for spec in all_passes().values():
        if spec.cli_name not in known:
            app.command(spec.cli_name, help=None, epilog=_pass_examples(spec))(make_pass_command(spec))
    generated = [c for c in app.registered_commands if c.name not in known]  # compressing commands first
    app.registered_commands[:] = generated + [c for c in app.registered_commands if c.name in known]


# -- fixed commands -------------------------------------------------------------------------
def _version(value: bool) -> None:
    if value:
        from compress.provenance import tool_version

        out_console.print(f"compress {tool_version()}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")] = None) -> None:
    """Make transformer checkpoints smaller and faster."""


def _calibration_params() -> list[inspect.Parameter]:
    return cliopts.parameters(CALIB_FLAGS)


def _run_command(**kw: Any) -> None:
    """Apply every stage of RECIPE to MODEL; check the recipe's quality gates if it has any.
    Calibration options override the recipe's (a cheap try of a shipped recipe: --n-samples 16)."""
    from compress.recipe import load_recipe

    rec = load_recipe(kw["recipe"])
    if rec.calibrates:
        rec = rec.model_copy(update={"calibration": _calibration(kw, "run", base=rec.calibration)})
    else:
        _refuse_calibration(kw, f"recipe {kw['recipe']}")
    if kw["seed"] is not None:
        rec = rec.model_copy(update={"seed": kw["seed"]})
    out = _execute(rec, kw["model"], kw["output"], kw["overwrite"], kw["force"], **_run_flags(kw))
    from compress.distributed import world

    if kw["gates"] and rec.gates is not None and world().main:
        _check_gates(rec.gates, out, kw["model"])


_run_command.__signature__ = _params(  # type: ignore[attr-defined]
    [_p("recipe", Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe (see recipes/)")])],
    _head_params(),
    [_p("gates", Annotated[bool, typer.Option("--gates/--no-gates", help="check the recipe's quality gates "
                                                                         "[default: --gates]", show_default=False)],
        True)],
    _calibration_params(),
    [_p("seed", Annotated[Optional[int], typer.Option("--seed", metavar="N", help="override the recipe's seed")],
        None)])
app.command("run", epilog=_examples(
    "compress run recipes/gptq-w4g64.yaml smollm2-135m -o out/w4g64",
    "compress run recipes/gptq-w4g64.yaml smollm2-135m -o out/w4 --n-samples 16",
    "compress plan recipes/gptq-w4g64.yaml smollm2-135m     # dry run first"))(_run_command)


def _check_gates(gates, out: Path, model: str) -> None:  # noqa: ANN001
    from compress.gates import GateFailure, check_gates

    with Steps() as steps:
        report = check_gates(gates, out, model, progress=steps)
    print_eval(report.result)
    if not report.passed:
        err = GateFailure(report, out)
        console.print(f"[red]gate failed[/red] ({report.protocol}): {'; '.join(report.failures)}; "
                      f"the output was kept at {out} ({err.fix})", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code)
    console.print(f"[green]gates passed[/green] ({report.protocol}, PPL ratio {report.ppl_ratio:.3f})")


@app.command("eval", epilog=_examples(
    "compress eval out/w4 --against smollm2-135m",
    "compress eval out/w4 --protocol brown-512-smoke      # quick",
    "compress eval out/w4 --data other.txt --json other.json  # → other-512"))
def eval_cmd(
    model: ModelArg,
    against: Annotated[Optional[str], typer.Option(
        metavar="MODEL", help="dense model to compare with [default: the output's origin, if present]",
        show_default=False)] = None,
    protocol: Annotated[str, typer.Option(metavar="NAME", help="named evaluation protocol (`compress list "
                                                               "--protocols`) [default: brown-512]",
                                          show_default=False)] = "brown-512",
    data: Annotated[Optional[str], typer.Option(metavar="FILE", help="evaluation text or JSONL file; the protocol "
                                                                      "is renamed after it [default: brown]",
                                                show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help=(
        "where to write the results [default: MODEL/eval-PROTOCOL.json for a writable compress output, "
        "else not written]"), show_default=False)] = None,
    device: DeviceOpt = None,  # type: ignore[assignment]
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Perplexity, dense perplexity, size and fidelity (KL, top-1) under a named protocol."""
    _trust(trust_remote_code)
    from compress.assets import resolve_model
    from compress.calib.protocol import corpus_protocol_name, get_protocol
    from compress.eval import evaluate

    dev, dmap = device_placement(device, device_map)
    get_protocol(protocol)
    mdir = resolve_model(model)
    target = eval_json_target(json_path, mdir, corpus_protocol_name(protocol, data))
    with Steps() as steps:
        res = evaluate(model, against, protocol=protocol, data=data, progress=steps, device=dev, device_map=dmap)
    print_eval(res)
    if target is None:
        console.print(f"results not saved ({mdir} is not a writable compress output): pass --json FILE",
                      highlight=False, soft_wrap=True)
        return
    write_json(target, res.to_json())


@app.command("list", epilog=_examples("compress list", "compress list --protocols", "compress list --archs",
                                      "compress gptq -h"))
def list_cmd(
    protocols: Annotated[bool, typer.Option("--protocols", help="list the named protocols instead")] = False,
    assets_: Annotated[bool, typer.Option("--assets", help="list the named offline assets instead")] = False,
    archs: Annotated[bool, typer.Option("--archs", help="list the supported model families × passes instead")] = False,
) -> None:
    """The registered passes (and `compress PASS -h` for their options), protocols, assets or
    the architecture support matrix."""
    from rich.table import Table

    if archs:
        from compress.summary import support_table

        out_console.print(support_table())
        return
    if protocols:
        from compress.calib.protocol import PROTOCOLS

        t = Table(title="protocols (a corpus other than brown renames them: other.txt → other-512)")
        for col in ("name", "seq len", "calib windows", "eval windows", "test lines"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for p in PROTOCOLS.values():
            t.add_row(p.name, str(p.seq_len), str(p.n_calib), str(p.n_eval), f"every {p.test_every}th")
        out_console.print(t)
        return
    if assets_:
        from compress.assets import ASSETS

        out_console.print("named assets (built offline into the cache on first use): " + ", ".join(ASSETS))
        return
    from compress.registry import all_passes

    t = Table(title="passes (options: compress COMMAND -h)")
    for col in ("command", "recipe pass", "calibration", "summary"):
        t.add_column(col)
    for spec in all_passes().values():
        calib = spec.needs_calibration
        t.add_row(spec.cli_name, spec.name, "depends" if callable(calib) else ("yes" if calib else "no"),
                  spec.summary)
    out_console.print(t)


@app.command("inspect", epilog=_examples("compress inspect out/w4", "compress inspect smollm2-135m"))
def inspect_model(model: ModelArg, trust_remote_code: TrustOpt = False) -> None:
    """Architecture, sizes and the compression manifest of a checkpoint."""
    _trust(trust_remote_code)
    from compress.summary import describe

    out_console.print(describe(model))


@app.command(epilog=_examples("compress plan recipes/gptq-w4g64.yaml smollm2-135m"))
def plan(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe")],
    model: ModelArg,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Dry run: validate, print the stages with their effective options, estimate output size and
    peak memory."""
    _trust(trust_remote_code)
    from compress.recipe import load_recipe
    from compress.summary import plan_recipe

    out_console.print(plan_recipe(load_recipe(recipe), model))


@app.command(epilog=_examples("compress assets smollm2-135m", "compress assets brown"))
def assets(name: Annotated[str, typer.Argument(metavar="NAME", help="smollm2-135m, minilm-l6 or brown")]) -> None:
    """Materialise a named offline asset into the cache and print its path."""
    from compress.assets import materialize

    out_console.print(str(materialize(name)), highlight=False, soft_wrap=True)


@app.command(epilog=_examples("compress demo", "compress demo -o out/demo --protocol brown-512-smoke"))
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="DIR", help=(
        "where to write the model [default: the cache's demo directory]"), show_default=False)] = None,
    protocol: Annotated[str, typer.Option(metavar="NAME", help="protocol for calibration and evaluation "
                                                               "[default: brown-512]",
                                          show_default=False)] = "brown-512",
    device: DeviceOpt = "auto",
) -> None:
    """GPTQ W4 g64 on SmolLM2-135M with the brown corpus, then the evaluation table."""
    from compress.assets import cache_dir, materialize
    from compress.device import device_name
    from compress.eval import evaluate
    from compress.registry import get_pass

    src = materialize("smollm2-135m")
    materialize("brown")
    out = output or cache_dir() / "demo" / "smollm2-135m-gptq-w4g64"
    config = get_pass("gptq").config_cls(bits=4, group_size=64)
    calib = _calibration({"protocol": protocol}, "demo")
    _execute(_recipe("demo-gptq-w4g64", [("gptq", config)], calib, 0), str(src), out, overwrite=True, force=False,
             device=device)
    with Steps() as steps:
        print_eval(evaluate(out, src, protocol=protocol, progress=steps, device=device_name(device)))


# -- serving: validate, bench, generate ----------------------------------------------------
@app.command("validate", epilog=_examples(
    "compress validate out/w4", "compress validate out/w4 --verbose --json v.json",
    "compress validate out/w4 --dtype fp32 --m 1 --m 300 --tolerance bf16=2e-2"))
def validate_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="compress output or compressed-tensors checkpoint")],
    tolerance: Annotated[Optional[list[str]], typer.Option(
        "--tolerance", metavar="[DTYPE=]X", help="max relative error: X for every dtype or DTYPE=X (repeatable) "
                                                 "[default: fp32=1e-5, bf16=1e-2, fp16=1e-3]",
        show_default=False)] = None,
    m: Annotated[Optional[list[int]], typer.Option(
        "--m", metavar="N", help="rows of each random input (repeatable) [default: 1 3 17 300]",
        show_default=False)] = None,
    dtype: Annotated[Optional[list[str]], typer.Option(
        "--dtype", metavar="fp32|bf16|fp16", help="activation dtypes (repeatable) [default: fp32 bf16]",
        show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="list every module, not only failures")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Run every compressed module's kernel path and its float64 reference; exit 1 past tolerance."""
    _trust(trust_remote_code)
    from compress.device import device_name
    from compress.validate import module_table, parse_tolerance, summary_table, validate

    check_json_writable(json_path)
    report = validate(model, ms=m, dtypes=dtype, tolerance=parse_tolerance(tolerance), seed=seed,
                      device=device_name(device))
    out_console.print(module_table(report, verbose=verbose))
    out_console.print(summary_table(report))
    if json_path is not None:
        write_json(json_path, report.to_json())
    if not report.ok:
        bad = len({c.module for c in report.failures}) + len(report.unvalidated)
        console.print(f"[red]validation failed[/red]: {bad} module(s) past tolerance or without a reference")
        raise typer.Exit(1)
    console.print(f"[green]validation passed[/green]: {len(report.checks)} checks")


@app.command(epilog=_examples(
    "compress bench out/w4 --against smollm2-135m", "compress bench out/w4 --seq 512 --decode-tokens 16 --json b.json"))
def bench(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="checkpoint dir or asset name (usually compressed)")],
    against: Annotated[Optional[str], typer.Option(metavar="MODEL", help="dense source [default: the manifest's "
                                                                         "origin]", show_default=False)] = None,
    seq: Annotated[Optional[list[int]], typer.Option(
        "--seq", metavar="N", help="prefill lengths (repeatable) [default: 512 2048]", show_default=False)] = None,
    decode_tokens: Annotated[int, typer.Option(metavar="N", help="decode steps timed (M = 1 with a KV cache); "
                                                                 "0 = skip [default: 32]", show_default=False)] = 32,
    prompt: Annotated[int, typer.Option(metavar="N", help="prompt tokens that fill the KV cache before decoding "
                                                          "[default: 32]", show_default=False)] = 32,
    repeats: Annotated[int, typer.Option(metavar="N", help="timed runs per phase (median reported) [default: 3]",
                                         show_default=False)] = 3,
    device: DeviceOpt = None,  # type: ignore[assignment]
    device_map: DeviceMapOpt = None,
    isolate: Annotated[bool, typer.Option(
        "--isolate/--in-process", help="a fresh process per measurement (clean peak memory) or all in this one "
                                       "[default: --isolate]", show_default=False)] = True,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Per-layer and end-to-end latency and peak memory, compressed vs dense (prefill and decode)."""
    _trust(trust_remote_code)
    from compress.bench import run_bench
    from compress.bench_report import layer_table, phase_table

    check_json_writable(json_path)
    dev, dmap = device_placement(device, device_map)
    with Steps() as steps:
        report = run_bench(model, against, seqs=seq, decode_tokens=decode_tokens, prompt=prompt, repeats=repeats,
                           device=dev or "auto", device_map=dmap, seed=seed, isolate=isolate, progress=steps)
    out_console.print(layer_table(report))
    out_console.print(phase_table(report))
    if json_path is not None:
        write_json(json_path, report.to_json())


@app.command(epilog=_examples(
    'compress generate out/w4 "The capital of France"',
    'compress generate out/w4 "Tell me a story" --sample --temperature 0.7 --chat'))
def generate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="checkpoint dir or asset name (a causal LM)")],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(metavar="N", help="tokens to generate at most [default: 64]",
                                                show_default=False)] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="sample, or take the argmax "
                                                                   "[default: --greedy]", show_default=False)] = False,
    temperature: Annotated[float, typer.Option(metavar="X", help="sampling temperature (with --sample) "
                                                                 "[default: 0.7]", show_default=False)] = 0.7,
    top_p: Annotated[float, typer.Option(metavar="X", help="nucleus sampling mass (with --sample) [default: 0.9]",
                                         show_default=False)] = 0.9,
    seed: SeedOpt = 0,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the tokenizer's chat template")] = False,
    device: DeviceOpt = None,  # type: ignore[assignment]
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Generate text with MODEL served through the shared kernels, so you can see it talk."""
    _trust(trust_remote_code)
    from compress.generate import generate as run_generate

    dev, dmap = device_placement(device, device_map)
    res = run_generate(model, prompt, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                       top_p=top_p, seed=seed, chat=chat, device=dev, device_map=dmap)
    out_console.print(res.text, markup=False, highlight=False)
    console.print(f"{res.new_tokens} tokens in {res.seconds:.2f} s ({res.new_tokens / res.seconds:.1f} tok/s), "
                  f"prompt {res.prompt_tokens} tokens, served by {res.served_by}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: one line and exit code 2 for user errors, no tracebacks."""
    _register_pass_commands()
    run_app(app)

if __name__ == "__main__":
    main()
