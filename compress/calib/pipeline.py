"""The sequential (layer-streaming) pipeline's per-layer machinery.

The calibration activations of the current block live in :class:`CalibState` (one tensor per
batch plus the keyword arguments the block is called with). A pass sees one block at a time
through :class:`LayerContext`: it can run the batches through the block with input hooks
(``collect`` accumulates Gram matrices of the inputs of named linears, stopping the forward as
soon as the last needed input has been seen), swap modules, and finally ``propagate`` replaces
the activations with the (compressed) block's outputs for the next block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compress.arch import Adapter
from compress.calib.hessian import GramAccumulator, MeanAccumulator
from compress.device import ActivationMode, host_buffer, offload_activations
from compress.model import get_module, set_module
from compress.modules.protocol import calibration_mode


class _StopForward(Exception):
    """Raised inside a hook once everything a pass needs from this forward has been seen."""


@dataclass
class CalibState:
    """Calibration activations entering the current block.

    ``hidden`` is one preallocated ``[n_windows, seq, dim]`` tensor that every block's output is
    copied back into, batch by batch: no per-batch tensors outlive a forward, so the heap is not
    fragmented by a stream of replaced buffers. ``kwargs[b]`` are what batch b's block call takes.
    ``hidden`` lives on the compute ``device`` or, when it does not fit there, on the host: then
    :meth:`batch` moves one batch to the device and :meth:`store` copies the output back, so a
    batch is the only activation on the device. Read batches with :meth:`batch` and write them
    with :meth:`store` (never in place into a batch: on the host path it is a copy).
    """

    hidden: Tensor
    kwargs: list[dict]
    batch_size: int
    args: list[tuple] = field(default_factory=list)
    #: columns of ``hidden`` in use (None: all); a block that changes the residual width (a
    #: sliced model) narrows it, so the buffer is never reallocated for narrower blocks
    width: int | None = None
    #: where the blocks compute (None: where ``hidden`` is)
    device: torch.device | None = None
    #: ``hidden`` lives on the host and every batch is copied to ``device`` and back
    offloaded: bool = False

    def call(self, layer: nn.Module, b: int, x: Tensor) -> object:
        """Call a block on batch ``b``'s input ``x`` with the extras it was called with."""
        extra = self.args[b] if self.args else ()
        return layer(x, *extra, **self.kwargs[b])

    def batches(self) -> range:
        return range(len(self.kwargs))

    def batch(self, b: int) -> Tensor:
        x = self.hidden[b * self.batch_size:(b + 1) * self.batch_size]  # a view, no copy
        x = x if self.width is None or self.width == x.shape[-1] else x[..., :self.width]
        return x.to(self.device, non_blocking=True, copy=True) if self.offloaded else x

    def store(self, b: int, out: Tensor) -> None:
        """Write batch ``b``'s block output over its input; the output may be wider or narrower
        (the buffer grows if needed). Call :meth:`set_width` once every batch is stored."""
        if out.shape[-1] > self.hidden.shape[-1]:
            wider = self.hidden.new_zeros((*self.hidden.shape[:-1], out.shape[-1]))
            wider[..., :self.hidden.shape[-1]] = self.hidden
            self.hidden = wider
        self.hidden[b * self.batch_size:(b + 1) * self.batch_size, ..., :out.shape[-1]] = out

    def set_width(self, width: int) -> None:
        self.width = None if width == self.hidden.shape[-1] else width

    def scratch(self) -> CalibState:
        """A second buffer of the same shape, home and batches (e.g. a block's mid residual)."""
        buf = host_buffer(tuple(self.hidden.shape), self.hidden.dtype, self.device) if self.offloaded \
            else torch.empty_like(self.hidden)
        return CalibState(buf, self.kwargs, self.batch_size, self.args, self.width, self.device, self.offloaded)


class _Catcher(nn.Module):
    """Stands in for block 0: copies its input into ``buffer[rows]`` and stops the forward."""

    def __init__(self, inner: nn.Module, n_windows: int, offload: Callable[[int], bool]) -> None:
        super().__init__()
        self.inner = inner
        self.n_windows = n_windows
        self.offload = offload
        self.offloaded = False
        self.buffer: Tensor | None = None
        self.kwargs: list[dict] = []
        self.args: list[tuple] = []
        self.filled = 0

    def forward(self, hidden: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if self.buffer is None:
            shape = (self.n_windows, *hidden.shape[1:])  # (windows, seq, dim)
            self.offloaded = self.offload(math.prod(shape) * hidden.element_size())
            self.buffer = host_buffer(shape, hidden.dtype, hidden.device) if self.offloaded else hidden.new_empty(shape)
        self.buffer[self.filled:self.filled + hidden.shape[0]] = hidden.detach()
        self.filled += hidden.shape[0]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
        if "use_cache" in kwargs or not args:
            kwargs["use_cache"] = False
        self.kwargs.append(kwargs)
        self.args.append(tuple(args))  # e.g. BERT passes its attention mask positionally
        raise _StopForward


def capture_block_inputs(model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int,
                         device: torch.device | None = None, activations: ActivationMode = "auto") -> CalibState:
    """Run the embeddings on every calibration batch and catch what block 0 receives.

    The embeddings run on ``device`` (default: the host); the caught activations stay there when
    they fit (:func:`compress.device.offload_activations`, ``activations``), else on the host."""
    device = device or torch.device("cpu")
    layers = get_module(model, adapter.layers)
    catcher = _Catcher(layers[0], windows.shape[0], lambda n: offload_activations(n, device, activations))
    layers[0] = catcher
    try:
        with torch.no_grad():
            for batch in windows.to(device).split(batch_size):
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = catcher.inner
    assert catcher.buffer is not None and catcher.filled == windows.shape[0]
    return CalibState(catcher.buffer, catcher.kwargs, batch_size, catcher.args, device=device,
                      offloaded=catcher.offloaded)


def block_output(out: object) -> Tensor:
    """The hidden states a block returns (a tensor or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


@dataclass
class LayerContext:
    """One block of the model during a pass.

    Args:
        index: block index; prefix: its checkpoint prefix (``model.layers.3.``).
        layer: the materialised block; adapter: where its linears are.
        state: calibration activations entering the block (None for data-free passes).
        hessian_dtype: accumulator dtype for Gram matrices.
    """

    index: int
    prefix: str
    layer: nn.Module
    adapter: Adapter
    state: CalibState | None
    hessian_dtype: torch.dtype = torch.float64
    info: dict = field(default_factory=dict)
    propagated: bool = False
    #: this block's scan statistics (a pass that declares a scan reads them here)
    stats: dict[str, Tensor] | None = None

    def module(self, rel: str) -> nn.Module:
        return get_module(self.layer, rel)

    def replace(self, rel: str, new: nn.Module) -> None:
        set_module(self.layer, rel, new)

    def run(self, pre_hooks: dict[str, Callable[[Tensor], None]],
            stop_at: str | None = None) -> None:
        """Forward every batch with input hooks; stop each forward after ``stop_at``'s hook."""
        if self.state is None:
            raise RuntimeError("this pass declared needs_calibration=False but ran the block")
        handles = []
        for rel, fn in pre_hooks.items():
            handles.append(self.module(rel).register_forward_pre_hook(
                _make_hook(fn, stop=(rel == stop_at))))
        try:
            with torch.no_grad(), calibration_mode(self.layer):
                for b in self.state.batches():
                    try:
                        self.state.call(self.layer, b, self.state.batch(b))
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()

    def collect(self, names: Sequence[str], propagate: bool = False) -> dict[str, Tensor]:
        """Mean ``XᵀX`` of the inputs of the linears ``names`` (relative paths), one forward.

        With ``propagate=True`` the forward runs to the end and the block's (still dense)
        outputs replace the activations: one forward feeds every Gram matrix *and* the next
        block, and :meth:`propagate` becomes a no-op for this block.
        """
        accs = {n: GramAccumulator(_in_features(self.module(n)), self.hessian_dtype) for n in names}
        hooks = {n: accs[n].add for n in names}
        if propagate:
            self._forward_in_place(hooks)
            self.propagated = True
        else:
            order = [n for n in self.adapter.linears if n in accs] or list(names)
            self.run(hooks, stop_at=order[-1])
        return {n: a.mean() for n, a in accs.items()}

    def collect_moments(self, names: Sequence[str], grams: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Mean ``XᵀX`` (when ``grams``) and mean ``x`` of the inputs of ``names``, one partial
        forward (the activations are not replaced)."""
        g = {n: GramAccumulator(_in_features(self.module(n)), self.hessian_dtype) for n in names} if grams else {}
        m = {n: MeanAccumulator(_in_features(self.module(n))) for n in names}

        def hook(n: str) -> Callable[[Tensor], None]:
            def add(x: Tensor) -> None:
                m[n].add(x)
                if n in g:
                    g[n].add(x)
            return add

        order = [n for n in self.adapter.linears if n in m] or list(names)
        self.run({n: hook(n) for n in names}, stop_at=order[-1])
        return {n: a.mean() for n, a in g.items()}, {n: a.mean() for n, a in m.items()}

    def _forward_in_place(self, pre_hooks: dict[str, Callable[[Tensor], None]]) -> None:
        assert self.state is not None
        handles = [self.module(rel).register_forward_pre_hook(_make_hook(fn, stop=False))
                   for rel, fn in pre_hooks.items()]
        try:
            with torch.no_grad(), calibration_mode(self.layer):
                self._store_outputs()
        finally:
            for h in handles:
                h.remove()

    def propagate(self) -> None:
        """Replace the activations with this (now compressed) block's outputs."""
        if self.state is None or self.propagated:
            return
        with torch.no_grad(), calibration_mode(self.layer):
            self._store_outputs()
        self.propagated = True

    def _store_outputs(self) -> None:
        """Run every batch through the block and write its outputs over the inputs."""
        assert self.state is not None
        width = None
        for b in self.state.batches():
            out = block_output(self.state.call(self.layer, b, self.state.batch(b)))
            self.state.store(b, out)
            width = out.shape[-1]
        if width is not None:
            self.state.set_width(width)


def _make_hook(fn: Callable[[Tensor], None], stop: bool):
    def hook(_mod: nn.Module, args: tuple) -> None:
        fn(args[0])
        if stop:
            raise _StopForward

    return hook


def _in_features(mod: nn.Module) -> int:
    for attr in ("in_features", "in_dim"):
        if hasattr(mod, attr):
            return int(getattr(mod, attr))
    raise TypeError(f"cannot tell the input width of {type(mod).__name__}")
