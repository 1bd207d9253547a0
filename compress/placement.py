"""Placing a loaded model across GPUs, host memory and disk with ``accelerate`` (``device_map``).

:func:`place` is what ``compress.load(path, device_map=...)`` runs once every tensor is real in
host memory. A string strategy (``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``)
is turned into a map by ``accelerate.infer_auto_device_map`` (``auto`` and ``balanced`` spread
the blocks evenly over the GPUs, ``sequential`` fills GPU 0 first), never splitting a decoder
block (the model's ``_no_split_modules`` plus the blocks' actual classes, e.g. a sliced block's
``SlicedLlamaDecoderLayer``). A dict (module name → ``0``/``"cuda:N"``/``"cpu"``/``"disk"``) is
used as given once its names and devices are checked. ``accelerate.dispatch_model`` then puts
each entry where the map says and hooks the modules so inputs follow the weights.

What is placed where, and why:

* **Main device**: the first GPU the map names, else the CPU. Offloaded entries (``"disk"``;
  ``"cpu"`` too when the main device is a GPU) keep their tensors there and run on the main
  device, each module's tensors loaded just before its ``forward`` and dropped after it.
* **Buffers are offloaded too** (``offload_buffers=True``): a ``QuantLinear`` / ``LutLinear``
  stores its codes and scales as buffers, so without it an offloaded quantised block would keep
  everything on the main device. Non-persistent buffers (RoPE frequencies) stay on it.
* **The shared-tensor holder** (``compress_shared``: bases and transforms that modules of many
  blocks read without calling it, see :class:`compress.modules.kinds.SharedTensors`) is pinned
  to the main device, never offloaded — a holder on disk would never be loaded, since no hook
  runs for a module that is never called. Its readers move what they read to their input's
  device. A dict that leaves it out gets it added; one that offloads it is refused. (Its bytes
  come on top of the main device's ``max_memory`` when the computed map had put it elsewhere.)
* **A tied head** (``lm_head.weight`` *is* the embedding's weight) goes with the embedding: a
  computed map is adjusted so, a dict that parts them is refused. ``dispatch_model`` re-ties
  them after hooking (``accelerate.utils.find_tied_parameters``).
* **Disk** entries are written (``.dat`` files and ``index.json``) into a fresh folder
  ``compress-offload-*`` inside ``offload_folder`` (default: the system temporary directory),
  which is deleted when the model is garbage-collected or the interpreter exits; its path is
  ``model.compress_offload_folder``. A fresh folder per load means a stale ``index.json`` from
  another model can never be read back.
* **FlashSVD**: a fused block reads its linears' factors without calling them, so its class is
  given to ``preload_module_classes`` (all its tensors are loaded on entering it).

The map is recorded as ``model.hf_device_map``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.modules.kinds import SHARED_PREFIX

#: the string strategies ``device_map`` accepts (``accelerate``'s names)
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
Device = int | str | torch.device
DeviceMap = str | Mapping[str, Device]
_OFFLOADED = ("cpu", "disk")


def place(model: nn.Module, device_map: DeviceMap, *, max_memory: Mapping[Device, int | str] | None = None,
          offload_folder: str | Path | None = None) -> nn.Module:
    """Dispatch ``model`` (every tensor real, on the CPU) according to ``device_map`` (see the
    module docstring); returns it, with ``hf_device_map`` set."""
    from accelerate import dispatch_model

    from compress.modules.flashsvd import is_fused

    if isinstance(device_map, str):
        if max_memory is not None:
            max_memory = _check_max_memory(max_memory)
        dmap = _inferred(model, device_map, max_memory)
    elif isinstance(device_map, Mapping):
        if max_memory is not None:
            raise CompressError("max_memory applies to a string device_map (auto, balanced, sequential)",
                                "drop max_memory, or pass device_map='auto'")
        dmap = _checked(model, device_map)
    else:
        raise CompressError(f"device_map must be one of {', '.join(STRATEGIES)} or a dict, "
                            f"not {type(device_map).__name__}", "e.g. device_map='auto'")
    main = _main_device(dmap)
    dmap = _expand_root(model, dmap)
    _pin_shared(model, dmap, main, user_named=isinstance(device_map, Mapping) and SHARED_PREFIX in device_map)
    offload_dir = _offload_dir(model, offload_folder) if "disk" in dmap.values() else None
    preload = sorted({type(m).__name__ for m in model.modules() if is_fused(m)})
    with _quiet_accelerate():
        dispatch_model(model, dmap, main_device=main, offload_dir=offload_dir, offload_buffers=True,
                       preload_module_classes=preload or None)
    return model.eval()


# -- string strategies -------------------------------------------------------------------------
def no_split_classes(model: nn.Module) -> list[str]:
    """Class names ``infer_auto_device_map`` must not split: the model's ``_no_split_modules``
    and the class every decoder/encoder block actually has (sliced blocks are subclasses)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    adapter = getattr(model, "compress_adapter", None)
    if adapter is not None:
        names |= {type(b).__name__ for b in model.get_submodule(adapter.layers)}
    return sorted(names)


def _inferred(model: nn.Module, strategy: str, max_memory: dict | None) -> dict[str, Device]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in STRATEGIES:
        raise CompressError(f"unknown device_map {strategy!r}", f"use one of {', '.join(STRATEGIES)} or a dict")
    no_split = no_split_classes(model)
    dtype = getattr(model, "dtype", None)
    with _quiet_accelerate():
        if strategy != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=strategy == "balanced_low_0")
        dmap = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                          dtype=dtype))
    head, emb = _tied_head(model)
    if head in dmap and _where(dmap, head) != _where(dmap, emb):  # one tensor: keep them together
        dmap[head] = _where(dmap, emb)  # type: ignore[index]
    return dmap


def _check_max_memory(max_memory: Mapping[Device, int | str]) -> dict:
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for key, value in max_memory.items():
        dev = _device(key, f"max_memory key {key!r}")
        try:
            out[dev] = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise CompressError(f"max_memory[{key!r}] = {value!r} is not a size",
                                "give bytes (an int) or a string such as '2GiB'") from None
    return out


# -- explicit maps -----------------------------------------------------------------------------
def _checked(model: nn.Module, device_map: Mapping[str, Device]) -> dict[str, Device]:
    """The dict with its devices normalised, refusing unknown names, overlaps, gaps and a tied
    head placed apart from its embedding (one line each). A module holding only buffers that
    are never stored (RoPE frequencies) and left out is added on the main device."""
    modules = dict(model.named_modules())
    dmap: dict[str, Device] = {}
    for name, value in device_map.items():
        if not isinstance(name, str) or (name and name not in modules):
            raise CompressError(f"device_map names {name!r}, which is not a module of this model",
                                "use names from model.named_modules(), e.g. 'model.layers.0' or 'lm_head'")
        dmap[name] = _device(value, f"device_map[{name!r}] = {value!r}")
    for name in dmap:
        outer = next((o for o in dmap if o != name and (o == "" or name.startswith(o + "."))), None)
        if outer is not None:
            raise CompressError(f"device_map places {name!r} twice (it is inside {outer!r})",
                                "give each module one entry: drop one of the two")
    left = [k for k in model.state_dict() if not k.startswith(SHARED_PREFIX + ".") and _where(dmap, k) is None]
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise CompressError(f"device_map leaves {left[0]}{more} unplaced",
                            f"add an entry for its module (e.g. {left[0].rpartition('.')[0]!r}: 'cpu')")
    for name, _ in sorted(model.named_buffers(), key=lambda kv: kv[0].count(".")):  # e.g. RoPE's inv_freq
        owner = name.rpartition(".")[0]
        if _where(dmap, name) is None and owner and not owner.startswith(SHARED_PREFIX):
            dmap[owner] = _main_device(dmap)  # never stored, so never covered: it computes with the main device
    head, emb = _tied_head(model)
    if head is not None and _where(dmap, head) != _where(dmap, emb):
        raise CompressError(f"device_map puts {head} on {_where(dmap, head)!r} but {emb} on "
                            f"{_where(dmap, emb)!r}; they share one tied weight", "give them the same device")
    return dmap


def _device(value: Device, what: str) -> Device:
    """``value`` as ``accelerate`` spells devices (GPU index, ``"cpu"``, ``"disk"``), checked
    against the machine."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool):
        raise CompressError(f"{what} is not a device", "use 'cpu', 'disk', a CUDA index (0) or 'cuda:N'")
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _OFFLOADED:
            return v
        m = re.fullmatch(r"cuda(?::(\d+))?", v)
        if m is None:
            raise CompressError(f"{what} is not a device", "use 'cpu', 'disk', a CUDA index (0) or 'cuda:N'")
        value = int(m.group(1) or 0)
    if not isinstance(value, int) or value < 0:
        raise CompressError(f"{what} is not a device", "use 'cpu', 'disk', a CUDA index (0) or 'cuda:N'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value >= count:
        raise CompressError(f"{what} names CUDA device {value} but this machine has "
                            f"{count or 'no'} CUDA device{'' if count == 1 else 's'}",
                            "use 'cpu' or 'disk'" if count == 0 else f"use a device 0..{count - 1}, 'cpu' or 'disk'")
    return value


# -- shared pieces ------------------------------------------------------------------------------
def _where(dmap: Mapping[str, Device], name: str) -> Device | None:
    """The device of the most specific entry that covers ``name`` (a module or tensor name)."""
    best = None
    for key in dmap:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else dmap[best]


def _tied_head(model: nn.Module) -> tuple[str | None, str | None]:
    """(head module, embedding module) names when the head's weight is the embedding's."""
    adapter = getattr(model, "compress_adapter", None)
    if adapter is None or adapter.head is None:
        return None, None
    head, emb = model.get_submodule(adapter.head), model.get_submodule(adapter.token_embedding)
    if getattr(head, "weight", None) is not None and head.weight is getattr(emb, "weight", None):
        return adapter.head, adapter.token_embedding
    return None, None


def _main_device(dmap: Mapping[str, Device]) -> Device:
    """The first GPU the map names (in its order), else the CPU: where offloaded entries run."""
    return next((d for d in dmap.values() if d not in _OFFLOADED), "cpu")


def _expand_root(model: nn.Module, dmap: dict[str, Device]) -> dict[str, Device]:
    """``{"": device}`` plus entries as the model's top-level children, so the shared holder (and
    a whole-model disk entry, which ``dispatch_model`` cannot offload) get entries of their own."""
    if "" not in dmap or (dmap[""] != "disk" and not hasattr(model, SHARED_PREFIX)):
        return dmap
    root = dmap.pop("")
    tops = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
    tops += [n for n, _ in model.named_buffers(recurse=False)]
    return {**{n: root for n in tops if n not in dmap}, **dmap}


def _pin_shared(model: nn.Module, dmap: dict[str, Device], main: Device, user_named: bool) -> None:
    """Give the shared holder the main device, unless the caller's dict offloads it (refused)."""
    if not hasattr(model, SHARED_PREFIX):
        return
    offloaded = ("disk",) if main == "cpu" else _OFFLOADED
    where = _where(dmap, SHARED_PREFIX)
    if where is not None and where in offloaded and user_named:
        raise CompressError(f"device_map offloads {SHARED_PREFIX} to {where!r}, but modules of many blocks read "
                            "these shared tensors without calling it", f"place it on {main!r} (or leave it out: "
                                                                       "it is then pinned there)")
    if where is None or where in offloaded:
        dmap[SHARED_PREFIX] = main


def _offload_dir(model: nn.Module, parent: str | Path | None) -> str:
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix="compress-offload-", dir=None if parent is None else str(parent))
    weakref.finalize(model, shutil.rmtree, path, ignore_errors=True)
    model.compress_offload_folder = path  # type: ignore[assignment]
    return path


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """``accelerate`` logs warnings (``Some parameters are on the meta device ...``) that, with no
    logging configured, reach stderr; what they say is in the docstring above."""
    log = logging.getLogger("accelerate")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# -- where inputs go ------------------------------------------------------------------------------
def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the token embedding's execution device (under a device map an
    offloaded embedding's weight is on meta, so its hook says), else the first real parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None:
        dev = execution_device(emb)
        if dev is not None:
            return dev
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and not w.is_meta:
            return w.device
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an ``accelerate`` hook runs ``module`` on, None without one."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def main_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the main device of its ``hf_device_map``, else its first parameter's."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        dev = _main_device(dmap)
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return input_device(model)
