"""The pass registry: ``@register_pass`` is the only way a pass becomes visible.

The CLI's per-pass subcommands, ``compress list`` and recipe validation are all generated
from :data:`PASSES`. ``compress.passes`` imports every pass module explicitly (no package walk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.pipeline.pass_api import Pass, PassConfig


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its name, typed config, implementation and what it needs."""

    name: str
    config_cls: type[PassConfig]
    pass_cls: type[Pass]
    needs_calibration: bool | Callable[[PassConfig], bool]
    summary: str
    cli_name: str
    examples: tuple[str, ...] = ()  # command lines shown in `compress CLI_NAME -h`

    def calibrates(self, config: PassConfig) -> bool:
        """Whether this pass, with this config, needs calibration data (e.g. whitened SVD)."""
        n = self.needs_calibration
        return bool(n(config)) if callable(n) else bool(n)


PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_cls: type[PassConfig], *,
                  needs_calibration: bool | Callable[[PassConfig], bool],
                  summary: str, cli_name: str | None = None,
                  examples: tuple[str, ...] = ()) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator registering a pass under ``name`` with its config model (``examples``:
    command lines for the help of its generated command)."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        cls.name = name
        PASSES[name] = PassSpec(name, config_cls, cls, needs_calibration, summary, cli_name or name, examples)
        return cls

    return deco


def get_pass(name: str) -> PassSpec:
    import compress.passes  # noqa: F401  (registers the built-in passes)

    if name not in PASSES:
        raise CompressError(f"unknown pass {name!r} (known: {', '.join(sorted(PASSES))})",
                            "run `compress list` to see the registered passes")
    return PASSES[name]


def all_passes() -> dict[str, PassSpec]:
    import compress.passes  # noqa: F401

    return dict(PASSES)


def support_matrix() -> dict[str, dict[str, str | None]]:
    """``model_type → pass → None`` (supported) or the one-line reason the pass refuses that
    family (its :meth:`Pass.check_input` on an uncompressed checkpoint), for ``compress list --archs``."""
    from compress.arch import ADAPTERS
    from compress.errors import CompressError

    out: dict[str, dict[str, str | None]] = {}
    for adapter in ADAPTERS:
        for model_type in adapter.model_types:
            row: dict[str, str | None] = {}
            for name, spec in all_passes().items():
                try:  # check_input reads the architecture and the manifest, not the options
                    spec.pass_cls(spec.config_cls.model_construct()).check_input(adapter, {})
                    row[name] = None
                except CompressError as e:
                    row[name] = e.problem
            out[model_type] = row
    return out

