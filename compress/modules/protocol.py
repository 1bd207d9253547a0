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
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
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


class DecodedWeightCache(ABC):
    """For a linear that stores codes (``QuantLinear``, ``LutLinear``): ``calibration_cache()``
    decodes ``dequantized_weight()`` once on entering and serves ``F.linear`` from it until exit
    (the twin's dequant + matmul path computes the same numbers; the module calls
    :meth:`_decoded_forward` first in ``forward``), and ``reference_forward`` is the float64 linear
    of the module's ``reference_weight()``."""

    _dense: Tensor | None = None
    bias: Tensor | None

    @abstractmethod
    def dequantized_weight(self, dtype: object = None) -> Tensor:
        """The dense weight the stored codes stand for, decoded by the kernels' dequantizer."""

    @contextlib.contextmanager
    def calibration_cache(self) -> Iterator[None]:
        self._dense = self.dequantized_weight(torch.float32)
        try:
            yield
        finally:
            self._dense = None

    @abstractmethod
    def reference_weight(self) -> Tensor:
        """The dense float64 weight decoded from the stored tensors without any kernel."""

    def reference_forward(self, x: Tensor) -> Tensor:
        """``x · Wᵀ + b`` in float64 plain torch from :meth:`reference_weight` (``compress validate``)."""
        bias = None if self.bias is None else self.bias.to(torch.float64)
        return torch.nn.functional.linear(x.to(torch.float64), self.reference_weight(), bias)

    def _decoded_forward(self, x: Tensor) -> Tensor | None:
        """The cached forward inside :meth:`calibration_cache`, None outside it."""
        if self._dense is None:
            return None
        return torch.nn.functional.linear(x, self._dense.to(x.dtype), self.bias)


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
