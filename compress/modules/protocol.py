"""The contract between runtime modules and ``compress validate`` / ``compress bench``.

A compressed runtime module (``QuantLinear``, a low-rank linear, ...) serves its ``forward``
through the shared kernels. To be checkable it also offers the same function written as plain,
obviously-correct torch math, so that a kernel bug shows up as a disagreement between the two:

* ``in_features`` — the width of the input ``x [..., in_features]`` that ``forward`` takes;
* ``reference_forward(x)`` — what ``forward(x)`` must return, computed from the *stored*
  tensors in float64 without calling any kernel or twin (unpack, dequantise / multiply the
  factors, matmul), returned in float64;
* ``kernel_path(x)`` — a short label of the code path ``forward(x)`` takes for this input
  (e.g. ``"triton gemv"``, ``"torch twin · planes"``), shown in the validate table.

The protocol is structural (:class:`typing.Protocol`): a module implements it by having these
members; nothing needs to be imported or subclassed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Validatable(Protocol):
    """A runtime module whose kernel-served ``forward`` can be checked against plain torch."""

    in_features: int

    def forward(self, x: Tensor) -> Tensor:
        """The kernel-served output ``[..., out]`` in ``x.dtype``."""
        ...

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same function in plain torch from the stored tensors, float64 ``[..., out]``."""
        ...

    def kernel_path(self, x: Tensor) -> str:
        """Label of the kernel path ``forward(x)`` takes (depends on rows, device, backend)."""
        ...


def validatable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every outermost module of ``model`` that implements :class:`Validatable`, in order.

    A module nested inside another validatable module is checked through its parent only.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if isinstance(mod, Validatable):
            found.append((name, mod))
    return found
