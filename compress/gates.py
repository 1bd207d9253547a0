"""Quality gates: a recipe's thresholds checked on its output, in the library (``compress.run``
and ``compress run`` both use :func:`check_gates`).

A gate compares the output with its dense source under the gate's protocol: the PPL ratio, the
top-1 next-token agreement and the mean KL(dense ‖ compressed). A failed gate keeps the output
(it is valid, only not good enough) and says where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import CompressError
from compress.recipe import Gates


@dataclass
class GateReport:
    """The evaluation a gate check ran and the thresholds it failed (empty: passed)."""

    protocol: str
    result: object  # compress.eval.EvalResult
    ppl_ratio: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


class GateFailure(CompressError):
    """The output was written but misses a quality gate (exit code 1, not a usage error)."""

    exit_code = 1

    def __init__(self, report: GateReport, out: Path) -> None:
        self.report, self.out = report, out
        super().__init__(f"gate failed ({report.protocol}): {'; '.join(report.failures)}; "
                         f"the output was kept at {out}", "inspect it, or delete it")


def check_gates(gates: Gates, out: str | Path, model: str | Path,
                progress: Callable[[int, int, str], None] | None = None) -> GateReport:
    """Evaluate ``out`` against the dense ``model`` under ``gates.protocol`` and list every
    threshold it misses."""
    from compress.eval import evaluate

    res = evaluate(out, model, protocol=gates.protocol, progress=progress)
    if not hasattr(res, "ppl"):
        raise CompressError("quality gates apply to causal LMs (PPL, KL, top-1)",
                            "drop the recipe's gates for an encoder, or run `compress eval`")
    ratio = res.ppl / res.dense_ppl if res.dense_ppl else float("inf")
    failures = []
    if gates.max_ppl_ratio is not None and ratio > gates.max_ppl_ratio:
        failures.append(f"PPL ratio {ratio:.3f} > {gates.max_ppl_ratio}")
    if gates.min_top1 is not None and (res.top1_agreement or 0.0) < gates.min_top1:
        failures.append(f"top-1 agreement {res.top1_agreement or 0.0:.3f} < {gates.min_top1}")
    if gates.max_kl is not None and (res.kl_mean if res.kl_mean is not None else float("inf")) > gates.max_kl:
        failures.append(f"KL {res.kl_mean if res.kl_mean is not None else float('inf'):.4g} > {gates.max_kl}")
    return GateReport(res.protocol, res, ratio, failures)
