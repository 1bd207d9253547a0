"""Command-line options generated from the typed configs: one vocabulary for every command.

Every option of a pass command (``compress gptq``, ``compress quantize``, ...) and every
calibration option is derived from a pydantic field: its flag from the field name (or
:data:`FLAG_NAMES`), its help from the field's ``description``, its metavar from the type and
its default from the config. A validation error of a field is reported in the terms the user
typed: the flag and the value (``--bits 5: input should be 2, 3, 4 or 8``), not the recipe key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from compress.errors import CompressError

FLAG_NAMES: dict[str, str] = {
    "symmetric": "--sym/--asym",  # the spelling practitioners know from GPTQ tools
    "targets": "--target",  # repeatable: one regex per flag
}
"""Fields whose flag is not ``--field-name`` (booleans: ``--on/--off``)."""

METAVARS: dict[str, str] = {"targets": "REGEX", "ignore": "REGEX", "data": "FILE", "protocol": "NAME"}


@dataclass(frozen=True)
class Flag:
    """One command-line option bound to one config field."""

    field: str
    decl: str  # "--bits", or "--sym/--asym" for a boolean
    help: str
    metavar: str | None
    typ: Any  # the Typer-facing annotation (always Optional: None = "not given")

    @property
    def name(self) -> str:
        """How the user spells the flag (the "on" form of a boolean)."""
        return self.decl.split("/")[0]

    def parameter(self) -> inspect.Parameter:
        """The keyword parameter of a Typer command for this flag (default None = not given)."""
        opt = typer.Option(self.decl, help=self.help, metavar=self.metavar, show_default=False)
        return inspect.Parameter(self.field, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=Annotated[self.typ, opt], default=None)


def _is_bool(annotation: Any) -> bool:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return annotation is bool or (len(args) == 1 and args[0] is bool)


def _type_and_metavar(annotation: Any) -> tuple[Any, str | None]:
    """Typer-friendly type for a field annotation, and the metavar that shows its values."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return (Optional[int] if all(isinstance(a, int) for a in args) else Optional[str]), "|".join(map(str, args))
    if origin is list:
        return Optional[list[str]], "X"
    non_none = [a for a in args if a is not type(None)] if args else [annotation]
    words = [str(w) for a in non_none if get_origin(a) is Literal for w in get_args(a)]
    if words and len(non_none) > 1:  # `int | Literal["auto"] | None`: a number or a word
        return Optional[str], "|".join(["N", *words])
    if len(non_none) == 1 and get_origin(non_none[0]) is Literal:  # `Literal[...] | None`: one of the words
        return Optional[str], "|".join(words)
    if len(non_none) == 1 and non_none[0] in (int, float, str):
        return Optional[non_none[0]], {int: "N", float: "X", str: "TEXT"}[non_none[0]]
    return Optional[str], "FILE"  # `dict | str`, `list | str`: the command line passes a file


def _default_text(field: str, default: Any, decl: str) -> str:
    if isinstance(default, bool):
        on, _, off = decl.partition("/")
        return on if default else (off or f"no {on}")
    if default is None:
        return "none"
    if isinstance(default, list):
        return "every linear" if field == "targets" and not default else (", ".join(map(str, default)) or "none")
    return str(default)


def flags_for(model: type[BaseModel], *, skip: tuple[str, ...] = ("version",),
              defaults: dict[str, str] | None = None) -> list[Flag]:
    """One :class:`Flag` per field of ``model`` (``defaults`` overrides the shown default text)."""
    out = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        if not f.description:
            raise TypeError(f"{model.__name__}.{name} has no description: every option needs help text")
        decl = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if _is_bool(f.annotation):
            if "/" not in decl:
                decl = f"{decl}/--no-{decl[2:]}"
            typ, metavar = Optional[bool], None
        else:
            typ, metavar = _type_and_metavar(f.annotation)
            metavar = METAVARS.get(name, metavar)
        shown = (defaults or {}).get(name) or _default_text(name, f.get_default(call_default_factory=True), decl)
        repeat = " (repeatable)" if get_origin(f.annotation) is list else ""
        out.append(Flag(name, decl, f"{f.description}{repeat} [default: {shown}]", metavar, typ))
    return out


def given(flags: list[Flag], kw: dict[str, Any]) -> dict[str, Any]:
    """The values the user typed for ``flags`` (options left out are None and dropped)."""
    return {fl.field: kw[fl.field] for fl in flags if kw.get(fl.field) not in (None, [])}


def validate(model: type[BaseModel], values: dict[str, Any], flags: list[Flag], command: str) -> BaseModel:
    """``model(**values)``, with a validation error reported as the flag and value typed."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise flag_error(e, flags, command) from None


def flag_error(e: ValidationError, flags: list[Flag], command: str) -> CompressError:
    """The first error of ``e`` as ``--flag VALUE: message`` (the flag the user typed)."""
    err = e.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    by_field = {fl.field: fl for fl in flags}
    loc = err.get("loc") or ()
    fl = by_field.get(str(loc[0])) if loc else None
    fix = f"see `compress {command} -h`"
    if fl is None:  # a rule across fields (e.g. "give exactly one of --ratio, --energy, --ranks")
        return CompressError(msg, fix)
    value = err.get("input")
    shown = f" {value}" if isinstance(value, (int, float, str)) and not isinstance(value, bool) else ""
    return CompressError(f"{fl.name}{shown}: {msg}", fix)


def parameters(flags: list[Flag]) -> list[inspect.Parameter]:
    return [fl.parameter() for fl in flags]


def grid_method(values: dict[str, Any], family: dict[str, Any]) -> str:
    """The method ``compress quantize`` runs without ``--method``: the pass whose config has the
    given ``grid`` as its grid (``--grid power``: nupes), else the only pass that has every given
    option (``--act-bits``/``--transform``: flatquant), else gptq."""
    grid = values.get("grid")
    if grid is not None:
        value = getattr(grid, "value", grid)
        for name, spec in family.items():
            field = spec.config_cls.model_fields.get("grid")
            if field is not None and field.default == value:
                return name
    owners = [n for n, spec in family.items() if all(f in spec.config_cls.model_fields for f in values)]
    if len(owners) == 1:
        return owners[0]
    return "gptq"
