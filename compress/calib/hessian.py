"""Second-moment accumulators for layer inputs.

``H = Σ xᵢ xᵢᵀ`` over every token row. Each batch's product is formed in float32 (a batch is
at most a few thousand rows, well inside float32's range) and added to an accumulator in
``dtype`` (float64 by default, where conditioning matters for Cholesky / eigh).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.distributed import all_reduce_sum, world
from compress.errors import NumericsError


def symmetric_gram(x: Tensor, block: int = 512) -> Tensor:
    """``xᵀx`` computing only the upper block triangle and mirroring it (≈ half the FLOPs for
    wide inputs; plain ``xᵀx`` below two blocks)."""
    d = x.shape[1]
    if d < 2 * block:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    starts = list(range(0, d, block))
    xt = x.T.contiguous()  # (dim, rows): row blocks of xt are column blocks of x
    for i in starts:
        rows = xt[i:i + block]
        out[i:i + block, i:] = rows @ x[:, i:]  # upper block row, diagonal block included
        out[i + block:, i:i + block] = out[i:i + block, i + block:].T
    return out


class _RunningSum:
    """A running sum of per-row statistics and the row count, allocated on the device of the
    first batch and summed over the processes of a data-parallel run (once, when read)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0
        self._reduced = False

    def _mean(self) -> Tensor:
        """``sum / count``; no rows or NaN/Inf is a loud error."""
        self._reduce()
        if self.count == 0 or self.sum is None:
            raise NumericsError("no calibration rows reached this layer", "check the calibration data")
        out = self.sum / self.count
        if not torch.isfinite(out).all():
            raise NumericsError("calibration statistics contain NaN/Inf",
                                "the model overflows on the calibration data; try float32 weights")
        return out

    def _reduce(self) -> None:
        """In a data-parallel run, sum the statistic and the row count over the processes (once)."""
        if self._reduced or world().size == 1:
            return
        if self.sum is None:  # no rows here; the others' sum is still this statistic
            raise NumericsError("a process of the data-parallel run saw no calibration rows",
                                "use fewer processes or more calibration windows")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        all_reduce_sum(self.sum)
        self.count = int(all_reduce_sum(count).item())
        self._reduced = True


class GramAccumulator(_RunningSum):
    """Running ``XᵀX`` (and row count) of a stream of ``[..., dim]`` activations, accumulated on
    the device of the activations (allocated by the first :meth:`add`)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (rows, dim)
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=x2.device)
        self.sum += symmetric_gram(x2).to(self.sum.dtype)
        self.count += x2.shape[0]

    def mean(self) -> Tensor:
        """``XᵀX / n`` in the accumulator dtype; NaN/Inf is a loud error."""
        return self._mean()


class MeanAccumulator(_RunningSum):
    """Running mean of a stream of ``[..., dim]`` activations (float64 sums on their device)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])  # (rows, dim)
        if self.sum is None:
            self.sum = torch.zeros(self.dim, dtype=torch.float64, device=x2.device)
        self.sum += x2.sum(0, dtype=torch.float64)
        self.count += x2.shape[0]

    def mean(self) -> Tensor:
        """``Σx / n`` (float64); NaN/Inf is a loud error."""
        return self._mean()
