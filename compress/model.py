"""Model skeletons on the meta device, filled one module at a time from a checkpoint.

``build_skeleton`` creates the ``transformers`` model from ``config.json`` with every parameter
on the meta device (buffers such as RoPE frequencies stay real), then applies the manifest:
model-level transforms (e.g. sliced widths) and per-module representations (QuantLinear, ...).
``materialize`` loads exactly the tensors under one module; ``release`` sends them back to
meta. The pipeline and ``compress.load`` are both built on these three functions.
"""

from __future__ import annotations

import re
import warnings

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from compress.arch import Adapter, get_adapter, remote_code_trusted
from compress.checkpoint import CheckpointReader
from compress.errors import CompressError, NumericsError
from compress.modules.kinds import (MODEL_TRANSFORMS, SHARED_PREFIX, SharedTensors, attach_shared, build_module,
                                    check_shared_refs, parse_entry, parse_shared)


def load_config(reader: CheckpointReader) -> transformers.PretrainedConfig:
    """The ``transformers`` config, without any ``quantization_config`` (we rebuild those modules)."""
    try:
        cfg = transformers.AutoConfig.from_pretrained(reader.path, trust_remote_code=remote_code_trusted())
    except (ValueError, KeyError) as e:
        raise CompressError(f"{reader.path}/config.json cannot be read by transformers ({e})",
                            "fix config.json (model_type, sizes)") from None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def config_dtype(cfg: transformers.PretrainedConfig) -> torch.dtype:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def build_skeleton(reader: CheckpointReader, adapter: Adapter | None = None,
                   manifest: dict | None = None, device: torch.device | None = None) -> nn.Module:
    """The model with parameters on meta and compressed modules already swapped in; the real
    buffers (RoPE frequencies, ...) on ``device`` when given (the run's compute device)."""
    adapter = adapter or get_adapter(reader.config)
    cfg = load_config(reader)
    auto = getattr(transformers, adapter.auto_class)
    with torch.device("cpu"), init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(cfg, attn_implementation=adapter.attention, dtype=config_dtype(cfg),
                                 trust_remote_code=remote_code_trusted())
    model.eval()
    manifest = manifest if manifest is not None else reader_manifest(reader)
    apply_manifest(model, manifest, adapter, reader)
    if device is not None:
        place_real_buffers(model, device)
    return model


def place_real_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the buffers that are real in a meta skeleton (non-persistent ones such as RoPE's
    ``inv_freq``, never stored in a checkpoint) onto ``device``."""
    for mod in model.modules():
        for leaf, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[leaf] = b.to(device)


def reader_manifest(reader: CheckpointReader) -> dict:
    """Our ``compression.json``, or one derived from a foreign compressed-tensors config."""
    own = reader.manifest()
    if own is not None:
        return migrate_manifest(own, reader)
    qc = reader.config.get("quantization_config")
    if qc and qc.get("quant_method") == "compressed-tensors":
        return {"modules": {}, "transforms": [], "compressed_tensors": qc}
    return {"modules": {}, "transforms": []}


def migrate_manifest(manifest: dict, reader: CheckpointReader) -> dict:
    """Bring a manifest written by an earlier release to the current format (in memory).

    * version 1 → 2: 3-bit codes were packed ten to an int32 word; the quant entries are marked
      ``packing: legacy-v1`` so their modules read that layout and repack it to the dense stream.
    * version 2 → 3: entries became typed (a field no kind defines is refused); entries written
      before ``act_order``/``observer`` were recorded read as off/minmax; a ``shared`` section
      (tensors stored once for several modules) exists, empty for older checkpoints.

    A manifest from a newer release is refused: its meaning cannot be guessed.
    """
    from compress.provenance import FORMAT_VERSION

    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise CompressError(f"{reader.path}/compression.json has format version {version!r}; this compress "
                            f"reads versions 1..{FORMAT_VERSION}", "upgrade compress to read this checkpoint")
    if not isinstance(manifest.get("modules", {}), dict):
        raise CompressError(f"{reader.path}/compression.json 'modules' is not an object",
                            "the manifest is damaged; re-run the compression")
    if version < 2:
        manifest = dict(manifest, modules={
            n: dict(e, packing="legacy-v1") if isinstance(e, dict) and e.get("kind") == "quant" else e
            for n, e in manifest.get("modules", {}).items()})
    if version < 3:
        manifest = dict(manifest, shared={}, format_version=FORMAT_VERSION)
    return manifest


def apply_manifest(model: nn.Module, manifest: dict, adapter: Adapter, reader: CheckpointReader) -> None:
    """Apply model-level transforms, attach the shared tensors (meta), then swap every listed
    module for its kind's runtime module; refuse a shared tensor that is referenced but absent."""
    for t in manifest.get("transforms", []):
        if t.get("kind") not in MODEL_TRANSFORMS:
            raise CompressError(f"unknown model transform {t.get('kind')!r} in compression.json",
                                "upgrade compress to a version that knows it")
        MODEL_TRANSFORMS[t["kind"]](model, t, adapter)
    modules = {n: parse_entry(n, e) for n, e in manifest.get("modules", {}).items()}
    if "compressed_tensors" in manifest:
        modules.update({n: parse_entry(n, e) for n, e in
                        compressed_tensors_modules(model, manifest["compressed_tensors"]).items()})
    groups = parse_shared(manifest.get("shared"))
    check_shared_refs(modules, groups, lambda key: key in reader, str(reader.path))
    shared = None
    if groups:
        shared = SharedTensors(groups)
        attach_shared(model, shared)
    for name, entry in modules.items():
        set_module(model, name, build_module(get_module(model, name), entry, shared, name))


def materialize_shared(model: nn.Module, reader: CheckpointReader, device: torch.device | None = None) -> None:
    """Load the model's shared tensors (every group) when it has any; the pipeline keeps them
    for the whole run, since modules of any block may read them."""
    shared = getattr(model, SHARED_PREFIX, None)
    if shared is not None:
        materialize(shared, f"{SHARED_PREFIX}.", reader, device=device)


def compressed_tensors_modules(model: nn.Module, qc: dict) -> dict[str, dict]:
    """Manifest entries for a compressed-tensors ``pack-quantized`` checkpoint made elsewhere."""
    if qc.get("format") != "pack-quantized":
        raise CompressError(f"compressed-tensors format {qc.get('format')!r} is not supported",
                            "only pack-quantized checkpoints can be loaded")
    ignore = qc.get("ignore") or []
    out: dict[str, dict] = {}
    for group in qc.get("config_groups", {}).values():
        w = group.get("weights") or {}
        if w.get("actorder") == "group":
            raise CompressError("act-order with g_idx (actorder='group') is not supported",
                                "re-quantize with actorder 'static'/'weight' or none")
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) or _matches(name, mod, ignore):
                continue
            if _matches(name, mod, group.get("targets", [])):
                gs = w.get("group_size") if w.get("strategy") == "group" else mod.in_features
                out[name] = {"kind": "quant", "format": "pack-quantized", "bits": w["num_bits"],
                             "group_size": gs, "symmetric": w.get("symmetric", True),
                             "in_features": mod.in_features, "out_features": mod.out_features,
                             "bias": mod.bias is not None}
    return out


def _matches(name: str, mod: nn.Module, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == type(mod).__name__ or t == name:
            return True
    return False


# -- module paths ------------------------------------------------------------------------
def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_module(model, parent), leaf, new)


# -- materialise / release ---------------------------------------------------------------
def materialize(module: nn.Module, prefix: str, reader: CheckpointReader,
                check_finite: bool = True, device: torch.device | None = None) -> None:
    """Load every parameter and persistent buffer of ``module`` from ``prefix + name`` (onto
    ``device`` when given: the pipeline's compute device; else they stay in host memory)."""
    slots = list(_slots(module))
    present = [prefix + name for name, *_ in slots if prefix + name in reader]
    tensors = reader.get_many(present)
    for name, owner, leaf, is_param in slots:
        key = prefix + name
        current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
        if key not in tensors:
            if is_param and current is not None and current.is_meta:
                raise CompressError(f"{reader.path} lacks tensor {key!r} that config.json implies",
                                    "the checkpoint does not match its config.json")
            continue
        t = tensors.pop(key)
        if current is not None and tuple(t.shape) != tuple(current.shape):
            raise CompressError(
                f"tensor {key} has shape {tuple(t.shape)} but config.json implies {tuple(current.shape)}",
                "the checkpoint does not match its config.json")
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericsError(f"tensor {key} contains NaN or Inf",
                                "repair the checkpoint; compressing it would spread the damage")
        if device is not None and device.type != "cpu":
            t = t.to(device)
        elif t.data_ptr() % 64:  # safetensors offsets are 8-byte aligned; BLAS is ~20% faster at 64
            t = t.clone()
        if is_param:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    for m in module.modules():  # e.g. repack a legacy layout once its tensors are real
        hook = getattr(m, "after_materialize", None)
        if callable(hook):
            hook()


def _slots(module: nn.Module):
    """(dotted name, owner, leaf, is_param) for every parameter / persistent buffer, once each."""
    seen: set[int] = set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for leaf, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield pre + leaf, mod, leaf, True
        for leaf, b in mod._buffers.items():
            if b is not None and leaf not in mod._non_persistent_buffers_set:
                yield pre + leaf, mod, leaf, False


def release(module: nn.Module) -> None:
    """Send a module's tensors back to the meta device (frees their memory)."""
    module.to("meta")


def tie_head(model: nn.Module, adapter: Adapter, reader: CheckpointReader) -> bool:
    """Share the token embedding with the head when the config ties them and the head is absent."""
    if adapter.head is None:
        return False
    key = f"{adapter.head}.weight"
    tied = bool(reader.config.get("tie_word_embeddings", False))
    if tied and key not in reader:
        emb, head = get_module(model, adapter.token_embedding), get_module(model, adapter.head)
        if "weight" not in head._parameters or getattr(emb, "weight", None) is None:
            return False  # both read stored codes instead (quant-tied)
        head.weight = emb.weight
        return True
    return False


def state_dict_of(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A module's persistent tensors keyed by full checkpoint name."""
    return {prefix + k: v for k, v in module.state_dict().items()}
