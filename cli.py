"""The ``compress`` command line: thin wrappers that build a Recipe and call the library.

Per-pass subcommands (``compress gptq``, ``compress rtn``, ...) are generated from the pass
registry. User errors print one line and exit with code 2; gate failures exit with code 1.
"""

from __future__ import annotations

import inspect
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from compress.errors import CompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make transformer checkpoints smaller and faster.")
console = Console(stderr=True)
out_console = Console()

OutOpt = Annotated[Path, typer.Option("--output", "-o", help="output directory (written atomically)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="calibration text/JSONL file (default: brown)")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="named calibration/eval protocol")]
SamplesOpt = Annotated[Optional[int], typer.Option("--n-samples", help="calibration windows (overrides the protocol)")]
SeqOpt = Annotated[Optional[int], typer.Option("--seq-len", help="tokens per window (overrides the protocol)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="windows per forward through a block")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]


def _progress() -> tuple[Progress, Any]:
    prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)
    state: dict[str, int] = {}

    def update(i: int, n: int, desc: str) -> None:
        if "task" not in state:
            state["task"] = prog.add_task(desc, total=n)
        prog.update(state["task"], completed=i, description=desc)

    return prog, update


def _recipe_from_stage(pass_name: str, config: dict, *, data: str | None, protocol: str,
                       n_samples: int | None, seq_len: int | None, batch_size: int, seed: int):
    from compress.recipe import parse_recipe

    return parse_recipe({"name": f"cli-{pass_name}", "seed": seed,
                         "calibration": {"protocol": protocol, "data": data, "batch_size": batch_size,
                                         "n_samples": n_samples, "seq_len": seq_len},
                         "stages": [{"pass": pass_name, "config": config}]}, source="options")


def _execute(recipe, model: str, output: Path, overwrite: bool) -> Path:
    from compress.assets import resolve_model
    from compress.report import print_table, read_json
    from compress.runner import run_recipe

    prog, update = _progress()
    with prog:
        out = run_recipe(recipe, resolve_model(model), output, overwrite=overwrite, progress=update)
    report = out / "reports" / "report.json"
    if report.is_file():
        print_table(read_json(report), console, title=f"{out.name}: per-layer report")
    console.print(f"[green]wrote[/green] {out}")
    for line in _output_notes(json.loads((out / "compression.json").read_text())):
        console.print(line, highlight=False, soft_wrap=True)
    return out


def _output_notes(manifest: dict) -> list[str]:
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
    return lines


# -- generated per-pass commands ------------------------------------------------------------
def _option_type(annotation: Any) -> tuple[Any, str]:
    """Typer-friendly type for a pydantic field annotation, and a help suffix."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        choices = [str(a) for a in args]
        if all(isinstance(a, int) for a in args):
            return Optional[int], f" (one of {', '.join(choices)})"
        return Optional[str], f" (one of {', '.join(choices)})"
    if origin is list:
        return Optional[list[str]], " (repeatable)"
    non_none = [a for a in args if a is not type(None)]
    words = [w for a in non_none if get_origin(a) is Literal for w in get_args(a)]
    if words and len(non_none) > 1:  # e.g. `int | Literal["auto"] | None`: a number or a word
        return Optional[str], f" ({' or '.join(map(str, words))} or a number)"
    if non_none and len(non_none) == 1:
        return Optional[non_none[0]], ""
    if str in non_none:  # e.g. `dict | str`: the command line passes the string form (a path)
        return Optional[str], ""
    return Optional[annotation], ""


def make_pass_command(spec) -> Any:  # noqa: ANN001
    """A Typer command whose options are the pass config's fields (defaults come from the config)."""
    fields = {k: f for k, f in spec.config_cls.model_fields.items() if k != "version"}

    def command(**kw: Any) -> None:
        config = {k: v for k, v in kw.items() if k in fields and v is not None}
        recipe = _recipe_from_stage(spec.name, config, data=kw["data"], protocol=kw["protocol"],
                                    n_samples=kw["n_samples"], seq_len=kw["seq_len"],
                                    batch_size=kw["batch_size"], seed=kw["seed"])
        _execute(recipe, kw["model"], kw["output"], kw["overwrite"])

    params = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[str, typer.Argument(help="checkpoint dir or asset name")]),
        inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=OutOpt),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=OverwriteOpt, default=False),
    ]
    for name, f in fields.items():
        typ, suffix = _option_type(f.annotation)
        flag = "--" + name.replace("_", "-")
        default = f.get_default(call_default_factory=True)
        help_ = (f.description or name.replace("_", " ")) + suffix + f" [default: {default}]"
        if f.annotation is bool:
            opt = typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=help_, show_default=False)
        else:
            opt = typer.Option(flag, help=help_, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[Optional[bool] if f.annotation is bool else typ, opt],
                                        default=None))
    params += [
        inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, annotation=DataOpt, default=None),
        inspect.Parameter("protocol", inspect.Parameter.KEYWORD_ONLY, annotation=ProtocolOpt, default="brown-512"),
        inspect.Parameter("n_samples", inspect.Parameter.KEYWORD_ONLY, annotation=SamplesOpt, default=None),
        inspect.Parameter("seq_len", inspect.Parameter.KEYWORD_ONLY, annotation=SeqOpt, default=None),
        inspect.Parameter("batch_size", inspect.Parameter.KEYWORD_ONLY, annotation=BatchOpt, default=8),
        inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=SeedOpt, default=0),
    ]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = f"{spec.summary}. Options mirror the `{spec.name}` recipe config."
    return command


def _register_pass_commands() -> None:
    from compress.registry import all_passes

    known = {c.name for c in app.registered_commands}
    for spec in all_passes().values():
        if spec.cli_name not in known:
            app.command(spec.cli_name, help=spec.summary)(make_pass_command(spec))


# -- fixed commands -------------------------------------------------------------------------
class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name")],
    output: OutOpt,
    bits: Annotated[int, typer.Option(help="code width: 2, 3, 4 or 8")] = 4,
    method: Annotated[Method, typer.Option(case_sensitive=False, help="quantiser")] = Method.gptq,
    group_size: Annotated[Optional[int], typer.Option(
        help="columns per scale; 0 = per channel [default: auto: the largest of 128/64/32 that divides "
             "every quantised width]", show_default=False)] = None,
    symmetric: Annotated[bool, typer.Option("--sym/--asym", help="symmetric grids")] = True,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantise by decreasing Hessian diagonal")] = True,
    mse: Annotated[bool | None, typer.Option("--mse/--no-mse", help="MSE-clipped grids (default: on for gptq, off for rtn)",
                                             show_default=False)] = None,
    damp: Annotated[float, typer.Option(help="GPTQ: dampening fraction of mean(diag H)")] = 0.01,
    overwrite: OverwriteOpt = False, data: DataOpt = None, protocol: ProtocolOpt = "brown-512",
    n_samples: SamplesOpt = None, seq_len: SeqOpt = None, batch_size: BatchOpt = 8, seed: SeedOpt = 0,
) -> None:
    """Quantise every linear of MODEL's blocks (RTN or GPTQ) into the pack-quantized format."""
    cfg: dict[str, Any] = {"bits": bits, "symmetric": symmetric}
    if group_size is not None:
        cfg["group_size"] = group_size
    if mse is not None:
        cfg["mse"] = mse
    if method is Method.gptq:
        cfg.update({"act_order": act_order, "damp": damp})
    recipe = _recipe_from_stage(method.value, cfg, data=data, protocol=protocol, n_samples=n_samples,
                                seq_len=seq_len, batch_size=batch_size, seed=seed)
    _execute(recipe, model, output, overwrite)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name")],
    output: OutOpt,
    overwrite: OverwriteOpt = False,
    gates: Annotated[bool, typer.Option("--gates/--no-gates", help="check the recipe's quality gates")] = True,
) -> None:
    """Apply every stage of RECIPE to MODEL; check the recipe's quality gates if it has any."""
    from compress.recipe import load_recipe

    rec = load_recipe(recipe)
    out = _execute(rec, model, output, overwrite)
    if gates and rec.gates is not None:
        _check_gates(rec.gates, out, model)


def _check_gates(gates, out: Path, model: str) -> None:  # noqa: ANN001
    from compress.eval import evaluate

    res = evaluate(out, model, protocol=gates.protocol)
    _print_eval(res)
    failures = []
    ratio = res.ppl / res.dense_ppl if res.dense_ppl else float("inf")
    if gates.max_ppl_ratio is not None and ratio > gates.max_ppl_ratio:
        failures.append(f"PPL ratio {ratio:.3f} > {gates.max_ppl_ratio}")
    if gates.min_top1 is not None and (res.top1_agreement or 0) < gates.min_top1:
        failures.append(f"top-1 agreement {res.top1_agreement:.3f} < {gates.min_top1}")
    if gates.max_kl is not None and (res.kl_mean or float("inf")) > gates.max_kl:
        failures.append(f"KL {res.kl_mean:.4f} > {gates.max_kl}")
    if failures:
        console.print(f"[red]gate failed[/red] ({gates.protocol}): " + "; ".join(failures))
        raise typer.Exit(1)
    console.print(f"[green]gates passed[/green] ({gates.protocol}, PPL ratio {ratio:.3f})")


def _print_eval(res) -> None:  # noqa: ANN001
    from rich.table import Table

    if hasattr(res, "cosine_mean"):  # an encoder: sentence-embedding fidelity
        from compress.eval_encoder import encoder_table

        out_console.print(encoder_table(res))
        return

    t = Table(title=f"evaluation ({res.protocol}, {res.eval_windows} windows, token perplexity)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("PPL", f"{res.ppl:.3f}"),
            ("dense PPL", "—" if res.dense_ppl is None else f"{res.dense_ppl:.3f}"),
            ("bytes on disk", f"{res.bytes_on_disk:,}"),
            ("dense bytes on disk", "—" if res.dense_bytes_on_disk is None else f"{res.dense_bytes_on_disk:,}"),
            ("effective bits/param (compressed linears)",
             "—" if res.effective_bits is None else f"{res.effective_bits:.3f}"),
            ("mean KL(dense‖compressed)", "—" if res.kl_mean is None else f"{res.kl_mean:.4f}"),
            ("top-1 agreement", "—" if res.top1_agreement is None else f"{res.top1_agreement:.4f}"),
            ("eval windows", str(res.eval_windows)),
            ("eval tokens", str(res.eval_tokens))]
    for r in rows:
        t.add_row(*r)
    out_console.print(t)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name")],
    against: Annotated[Optional[str], typer.Option(help="dense model to compare with")] = None,
    protocol: ProtocolOpt = "brown-512",
    data: Annotated[Optional[str], typer.Option(help="evaluation text file (default: brown)")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="where to write the JSON")] = None,
) -> None:
    """Perplexity, dense perplexity, size and fidelity (KL, top-1) under a named protocol."""
    from compress.assets import resolve_model
    from compress.calib.protocol import corpus_protocol_name
    from compress.eval import evaluate

    res = evaluate(model, against, protocol=protocol, data=data)
    _print_eval(res)
    mdir = resolve_model(model)
    if json_path is None:  # named after the protocol as applied to the data (other.txt → other-512)
        name = corpus_protocol_name(protocol, data)
        json_path = (mdir if (mdir / "compression.json").is_file() else Path.cwd()) / f"eval-{name}.json"
    json_path.write_text(res.to_json() + "\n")
    console.print(f"wrote {json_path}")


@app.command("list")
def list_cmd() -> None:
    """Registered passes and their config fields."""
    from rich.table import Table

    from compress.registry import all_passes

    t = Table(title="passes")
    for col in ("command", "pass", "calibration", "summary", "config fields"):
        t.add_column(col)
    for spec in all_passes().values():
        fields = ", ".join(k for k in spec.config_cls.model_fields if k != "version")
        calib = spec.needs_calibration
        t.add_row(spec.cli_name, spec.name, "depends" if callable(calib) else ("yes" if calib else "no"),
                  spec.summary, fields)
    out_console.print(t)


@app.command("inspect")
def inspect_model(model: Annotated[str, typer.Argument(help="checkpoint dir or asset name")]) -> None:
    """Architecture, sizes and the compression manifest of a checkpoint."""
    from compress.summary import describe

    out_console.print(describe(model))


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name")],
) -> None:
    """Dry run: validate, print the stages, estimate output bytes and peak memory."""
    from compress.summary import plan_recipe
    from compress.recipe import load_recipe

    out_console.print(plan_recipe(load_recipe(recipe), model))


@app.command()
def assets(name: Annotated[str, typer.Argument(help="smollm2-135m, minilm-l6 or brown")]) -> None:
    """Materialise a named offline asset into the cache and print its path."""
    from compress.assets import materialize

    out_console.print(str(materialize(name)))


@app.command()
def demo(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="where to write the model")] = None,
    protocol: ProtocolOpt = "brown-512",
) -> None:
    """GPTQ W4 g64 on SmolLM2-135M with the brown corpus, then the evaluation table."""
    from compress.assets import cache_dir, materialize
    from compress.eval import evaluate

    src = materialize("smollm2-135m")
    materialize("brown")
    out = output or cache_dir() / "demo" / "smollm2-135m-gptq-w4g64"
    recipe = _recipe_from_stage("gptq", {"bits": 4, "group_size": 64}, data=None, protocol=protocol,
                                n_samples=None, seq_len=None, batch_size=8, seed=0)
    _execute(recipe, str(src), out, overwrite=True)
    _print_eval(evaluate(out, src, protocol=protocol))


# -- serving: validate, bench, generate ----------------------------------------------------
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON here")]


@app.command("validate")
def validate_cmd(
    model: Annotated[str, typer.Argument(help="compress output or compressed-tensors checkpoint")],
    tolerance: Annotated[Optional[list[str]], typer.Option(
        "--tolerance", help="max relative error: VALUE (every dtype) or DTYPE=VALUE (repeatable) "
                            "[default: fp32=1e-5, bf16=1e-2, fp16=1e-3]", show_default=False)] = None,
    m: Annotated[Optional[list[int]], typer.Option(
        "--m", help="rows of each random input (repeatable) [default: 1 3 17 300]", show_default=False)] = None,
    dtype: Annotated[Optional[list[str]], typer.Option(
        "--dtype", help="activation dtypes: fp32, bf16, fp16 (repeatable) [default: fp32 bf16]",
        show_default=False)] = None,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
) -> None:
    """Run every compressed module's kernel path and its float64 reference; exit 1 past tolerance."""
    from compress.validate import module_table, parse_tolerance, summary_table, validate

    report = validate(model, ms=m, dtypes=dtype, tolerance=parse_tolerance(tolerance), seed=seed)
    out_console.print(module_table(report))
    out_console.print(summary_table(report))
    if json_path is not None:
        json_path.write_text(report.to_json() + "\n")
        console.print(f"wrote {json_path}")
    if not report.ok:
        bad = len({c.module for c in report.failures}) + len(report.unvalidated)
        console.print(f"[red]validation failed[/red]: {bad} module(s) past tolerance or without a reference")
        raise typer.Exit(1)
    console.print(f"[green]validation passed[/green]: {len(report.checks)} checks")


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name (usually compressed)")],
    against: Annotated[Optional[str], typer.Option(help="dense source [default: the manifest's origin]")] = None,
    seq: Annotated[Optional[list[int]], typer.Option(
        "--seq", help="prefill lengths (repeatable) [default: 512 2048]", show_default=False)] = None,
    decode_tokens: Annotated[int, typer.Option(help="decode steps timed (M = 1 with a KV cache); 0 = skip")] = 32,
    prompt: Annotated[int, typer.Option(help="prompt tokens that fill the KV cache before decoding")] = 32,
    repeats: Annotated[int, typer.Option(help="timed runs per phase (median reported)")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    isolate: Annotated[bool, typer.Option(
        "--isolate/--in-process", help="fresh process per measurement (clean peak memory) or all in this one")] = True,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
) -> None:
    """Per-layer and end-to-end latency and peak memory, compressed vs dense (prefill and decode)."""
    from compress.bench import run_bench
    from compress.bench_report import layer_table, phase_table

    prog, update = _progress()
    with prog:
        report = run_bench(model, against, seqs=seq, decode_tokens=decode_tokens, prompt=prompt,
                           repeats=repeats, device=device, seed=seed, isolate=isolate, progress=update)
    out_console.print(layer_table(report))
    out_console.print(phase_table(report))
    if json_path is not None:
        json_path.write_text(report.to_json() + "\n")
        console.print(f"wrote {json_path}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="checkpoint dir or asset name (a causal LM)")],
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="sample or take the argmax")] = False,
    temperature: Annotated[float, typer.Option(help="sampling temperature (with --sample)")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass (with --sample)")] = 0.9,
    seed: SeedOpt = 0,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the tokenizer's chat template")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Generate text with MODEL served through the shared kernels, so you can see it talk."""
    from compress.bench import resolve_device
    from compress.generate import generate as run_generate

    res = run_generate(model, prompt, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                       top_p=top_p, seed=seed, chat=chat, device=resolve_device(device))
    out_console.print(res.text, markup=False, highlight=False)
    console.print(f"{res.new_tokens} tokens in {res.seconds:.2f} s ({res.new_tokens / res.seconds:.1f} tok/s), "
                  f"prompt {res.prompt_tokens} tokens, served by {res.served_by}", highlight=False, soft_wrap=True)


def _usage_error_classes() -> tuple[type[BaseException], ...]:
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


def main() -> None:
    """Console entry point: one line and exit code 2 for user errors, no tracebacks."""
    _register_pass_commands()
    usage_errors = _usage_error_classes()
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


if __name__ == "__main__":
    main()
