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

How a module runs *during calibration* is also the module's business, not the pipeline's: a
module may offer ``calibration_cache()``, a context manager under which its forward is cheaper
for many batches (e.g. ``QuantLinear`` decodes its codes once); :func:`calibration_mode` enters
it for every module of a block. A block that the staged (attention-then-MLP) calibration cannot
run says so with ``supports_staged_calibration = False`` (:func:`supports_staged_calibration`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def calibration_mode(root: nn.Module) -> Iterator[None]:
    """Run ``root`` as calibration does (many batches through one block): every module under it
    that offers ``calibration_cache()`` enters it for the duration (numbers unchanged)."""
    with contextlib.ExitStack() as stack:
        for mod in root.modules():
            cache = getattr(mod, "calibration_cache", None)
            if callable(cache):
                stack.enter_context(cache())
        yield


def supports_staged_calibration(block: nn.Module) -> bool:
    """Whether the staged calibration (attention, then MLP, on a standard pre-norm block) can run
    ``block``; a block kind that changes the residual structure opts out."""
    return bool(getattr(block, "supports_staged_calibration", True))


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
