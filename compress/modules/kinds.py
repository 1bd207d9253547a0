"""Module kinds: the typed representations a compressed checkpoint holds.

Every compressed module in ``compression.json`` is ``{"kind": ..., ...}``; the kind names a
:class:`ModuleKind` registered with :func:`register_kind` together with the pydantic model of its
entry (``extra="forbid"``: a field this release does not know is refused, not ignored). A kind
owns everything that depends on the representation:

* ``build`` — the runtime module for ``compress.load`` and the pipeline, built on the meta
  device, whose ``state_dict`` names are the tensors stored under the module's name;
* ``stored_bytes`` — the bytes its own tensors take (``compress inspect`` and ``compress plan``);
* ``export_refusal`` — why the entry has no compressed-tensors form (None when it has one);
* the calibration-time forward (``calibration_cache()``) and the validation protocol
  (``reference_forward`` / ``kernel_path``) live on the built module (:mod:`.protocol`).

Tensors used by several modules (one low-rank basis for q/k/v, one transform for the input
they share) are stored once, in the manifest's ``shared`` section: group ``g``'s tensor ``t`` is
``compress_shared.g.t`` in the checkpoint and a buffer of :class:`SharedTensors` (attached to
the model as ``compress_shared``) at run time. An entry names the groups it reads with
:meth:`KindEntry.shared_refs`; a module looks its shared tensors up at every forward, so moving
the model moves them once.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from compress.errors import CompressError

SHARED_PREFIX = "compress_shared"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class KindEntry(BaseModel):
    """Fields every module entry has: its kind and the dense shape it stands for."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    in_features: int = Field(ge=1)
    out_features: int = Field(ge=1)
    bias: bool = False

    def shared_refs(self) -> list[str]:
        """Names of the ``shared`` groups this entry reads (none by default)."""
        return []

    def dump(self) -> dict:
        """The JSON form written into ``compression.json`` (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


E = TypeVar("E", bound=KindEntry)


class ModuleKind(ABC, Generic[E]):
    """What one representation knows about itself (see the module docstring)."""

    name: ClassVar[str]
    entry_model: ClassVar[type[KindEntry]]

    @abstractmethod
    def build(self, original: nn.Module, entry: E, shared: SharedTensors | None) -> nn.Module:
        """The runtime module for ``entry`` on the meta device (``original``: what it replaces)."""

    @abstractmethod
    def stored_bytes(self, entry: E, dtype: torch.dtype) -> int:
        """Bytes of the tensors stored under this module's name (shared groups not counted)."""

    def export_refusal(self, entry: E) -> str | None:
        """Why compressed-tensors cannot describe this module (None: it can)."""
        return f"{self.name} modules have no compressed-tensors format"


MODULE_KINDS: dict[str, ModuleKind] = {}


def register_kind(name: str, entry_model: type[KindEntry]) -> Callable[[type[ModuleKind]], type[ModuleKind]]:
    """Class decorator: register representation ``name`` with its entry model."""

    def deco(cls: type[ModuleKind]) -> type[ModuleKind]:
        if name in MODULE_KINDS:
            raise ValueError(f"module kind {name!r} registered twice")
        cls.name, cls.entry_model = name, entry_model
        MODULE_KINDS[name] = cls()
        return cls

    return deco


def get_kind(name: object) -> ModuleKind:
    if isinstance(name, str) and name not in MODULE_KINDS:
        import compress.modules  # noqa: F401  (registers the built-in kinds)
    if not isinstance(name, str) or name not in MODULE_KINDS:
        raise CompressError(f"unknown module kind {name!r} in compression.json",
                            "upgrade compress to a version that knows this representation")
    return MODULE_KINDS[name]


def parse_entry(module: str, raw: object) -> KindEntry:
    """The typed entry of ``module``; one-line refusal when it is not a valid entry of its kind."""
    if isinstance(raw, KindEntry):
        return raw
    if not isinstance(raw, dict):
        raise CompressError(f"compression.json entry of {module} is not an object",
                            "the manifest is damaged; re-run the compression that wrote it")
    kind = get_kind(raw.get("kind"))
    try:
        return kind.entry_model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "entry"
        raise CompressError(f"compression.json entry of {module} ({kind.name}): {where}: {err['msg']}",
                            "the manifest is damaged or from another release; re-run the compression") from None


def entry_bytes(entry: KindEntry, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the tensors of ``entry`` take on disk (its kind's accounting)."""
    return get_kind(entry.kind).stored_bytes(entry, dtype)


def build_module(original: nn.Module, entry: dict | KindEntry, shared: SharedTensors | None = None,
                 name: str = "?") -> nn.Module:
    typed = parse_entry(name, entry)
    return get_kind(typed.kind).build(original, typed, shared)


# -- shared tensors ----------------------------------------------------------------------
class SharedTensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    dtype: str

    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise CompressError(f"shared tensor dtype {self.dtype!r} is not a torch dtype",
                                "the manifest is damaged; re-run the compression")
        return dt


class SharedGroup(BaseModel):
    """One ``shared`` group: its tensors and the modules that read it (for inspect and checks)."""

    model_config = ConfigDict(extra="forbid")

    tensors: dict[str, SharedTensorSpec]
    users: list[str] = []


def parse_shared(raw: object) -> dict[str, SharedGroup]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CompressError("compression.json 'shared' is not an object", "re-run the compression")
    out = {}
    for g, spec in raw.items():
        if not _GROUP_NAME.match(str(g)):
            raise CompressError(f"shared group name {g!r} in compression.json is not [A-Za-z0-9_]+",
                                "the manifest is damaged; re-run the compression")
        try:
            out[g] = SharedGroup.model_validate(spec)
        except ValidationError as e:
            raise CompressError(f"compression.json shared group {g!r}: {e.errors()[0]['msg']}",
                                "the manifest is damaged; re-run the compression") from None
    return out


def shared_key(group: str, tensor: str) -> str:
    """The checkpoint name of a shared tensor."""
    return f"{SHARED_PREFIX}.{group}.{tensor}"


class SharedTensors(nn.Module):
    """The model's shared tensors: group ``g`` is a child module whose buffers are its tensors,
    so ``compress_shared.g.t`` is both the checkpoint name and the ``state_dict`` name."""

    def __init__(self, groups: dict[str, SharedGroup] | None = None) -> None:
        super().__init__()
        for g, spec in (groups or {}).items():
            self.add_group(g, {t: torch.empty(s.shape, dtype=s.torch_dtype(), device="meta")
                               for t, s in spec.tensors.items()})

    def add_group(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        if not _GROUP_NAME.match(group):
            raise ValueError(f"shared group name {group!r} must match [A-Za-z0-9_]+")
        if hasattr(self, group):
            raise ValueError(f"shared group {group!r} exists already")
        holder = nn.Module()
        for t, value in tensors.items():
            holder.register_buffer(t, value)
        self.add_module(group, holder)

    def get(self, group: str, tensor: str) -> torch.Tensor:
        return getattr(self.get_submodule(group), tensor)

    def spec(self, group: str) -> SharedGroup:
        holder = self.get_submodule(group)
        return SharedGroup(tensors={t: SharedTensorSpec(shape=list(b.shape), dtype=str(b.dtype).removeprefix("torch."))
                                    for t, b in holder.named_buffers()})


def attach_shared(model: nn.Module, shared: SharedTensors) -> None:
    """Hang ``shared`` on the model (once) so ``state_dict``/``to()`` include it."""
    setattr(model, SHARED_PREFIX, shared)


def model_shared(model: nn.Module) -> SharedTensors | None:
    return getattr(model, SHARED_PREFIX, None)


def check_shared_refs(modules: dict[str, KindEntry], groups: dict[str, SharedGroup],
                      present: Callable[[str], bool], where: str) -> None:
    """Every shared group an entry reads is declared, and every declared tensor is stored."""
    for name, entry in modules.items():
        for g in entry.shared_refs():
            if g not in groups:
                raise CompressError(f"{where}: {name} reads shared group {g!r}, which compression.json "
                                    "does not declare", "the checkpoint is incomplete; re-run the compression")
            for t in groups[g].tensors:
                if not present(shared_key(g, t)):
                    raise CompressError(f"{where}: shared tensor {shared_key(g, t)} (read by {name}) is "
                                        "missing from the checkpoint",
                                        "the checkpoint is incomplete; re-run the compression that wrote it")


# -- model-level transforms (sliced widths) ----------------------------------------------
Transform = Callable[[nn.Module, dict, object], None]
MODEL_TRANSFORMS: dict[str, Transform] = {}


def register_transform(kind: str) -> Callable[[Transform], Transform]:
    """Decorator: register a model-level structural transform (e.g. sliced widths)."""

    def deco(fn: Transform) -> Transform:
        if kind in MODEL_TRANSFORMS:
            raise ValueError(f"model transform {kind!r} registered twice")
        MODEL_TRANSFORMS[kind] = fn
        return fn

    return deco


def original_dtype(original: nn.Module) -> torch.dtype:
    """The floating dtype a replacement module should take: the replaced module's weight dtype,
    float32 when it has no floating weight (e.g. a meta placeholder without one)."""
    w = getattr(original, "weight", None)
    return w.dtype if w is not None and w.is_floating_point() else torch.float32


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
