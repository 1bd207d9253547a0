"""Shared fixtures: tiny random models built from ``transformers`` config classes, with a small
BPE tokenizer trained on the brown corpus, so most tests need no downloaded asset."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("COMPRESS_CACHE", str(ROOT / ".cache" / "compress"))
# the ignored cache directory exists before any test runs, so the leak check below never counts it
(ROOT / ".cache").mkdir(exist_ok=True)
# Triton reads TRITON_INTERPRET when it is first imported, and some test modules import it at
# collection (compressed-tensors does, for the interop tests) before tests/kernels/conftest.py
# is read; set it here, first, so the kernel tests always run under the CPU interpreter. The
# default dispatch on CPU tensors stays the torch twin (compress/kernels/_triton.py).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_leaked_files():
    """A test must not leave files in the repository (outputs go to tmp_path)."""
    before = set(os.listdir(ROOT))
    yield
    leaked = set(os.listdir(ROOT)) - before - {".pytest_cache"}
    assert not leaked, f"test left files in the repo root: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def _exact_kernels_unless_native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests compare against fp32 references at fp32 tolerance, so they run the exact torch twin
    (``COMPRESS_KERNELS=torch``) unless marked ``native_kernels``: those exercise the default CPU
    path (torch's native int4/int8 ops, bf16 activations) and check it against the twin at bf16
    tolerance. A ``COMPRESS_KERNELS`` set by the caller is left alone."""
    if request.node.get_closest_marker("native_kernels") is None and "COMPRESS_KERNELS" not in os.environ:
        monkeypatch.setenv("COMPRESS_KERNELS", "torch")


def brown_lines(n: int = 3000) -> list[str]:
    from compress.calib.corpus import load_corpus

    return load_corpus(None)[0][:n]


def train_tokenizer(path: Path, vocab: int = 400) -> None:
    """A byte-level BPE tokenizer trained on the start of brown, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(brown_lines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def make_llama(path: Path, *, layers: int = 3, tie: bool = True, seed: int = 0, bias: bool = False,
               model_type: str = "llama") -> Path:
    """Save a tiny random LLaMA-family model (+ tokenizer) to ``path``."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
           "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig}[model_type]
    kw = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=tie)
    if model_type in ("qwen3", "gemma2", "gemma3_text"):
        kw["head_dim"] = 16  # their default is not hidden / heads
    if model_type in ("phi3", "gemma2", "gemma3_text"):
        kw["pad_token_id"] = 0  # Phi-3's default pad id is past a 400-token vocabulary
    if model_type == "llama":
        kw["attention_bias"] = bias
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return path


def make_opt(path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random OPT decoder (+ tokenizer): LayerNorm, ReLU FFN, learned positions."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    cfg = transformers.OPTConfig(vocab_size=400, hidden_size=64, ffn_dim=96, num_hidden_layers=layers,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def make_bert(path: Path, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random BERT encoder (+ the MiniLM-style WordPiece-free BPE tokenizer)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    cfg = transformers.BertConfig(vocab_size=400, hidden_size=48, intermediate_size=80,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  max_position_embeddings=256)
    torch.manual_seed(seed)
    transformers.BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("tinyb") / "bert")


def dir_hash(path: Path) -> str:
    """sha256 over every file (names and bytes) under ``path``."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the real console entry point in-process; returns (exit code, stdout, stderr)."""
    import cli

    monkeypatch.setattr(sys, "argv", ["compress", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


SMOKE = ["--protocol", "brown-128-smoke", "--batch-size", "4"]


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Serve quantised linears through the exact fp32 torch twin (``COMPRESS_KERNELS=torch``) for
    comparisons held to fp32 tolerance; by default CPU linears take torch's native int4/int8 ops
    with bf16 activations (checked against the twin at bf16 tolerance in tests/kernels)."""
    old = os.environ.get("COMPRESS_KERNELS")
    os.environ["COMPRESS_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["COMPRESS_KERNELS"]
        else:
            os.environ["COMPRESS_KERNELS"] = old


def error_lines(err: str) -> list[str]:
    """Non-blank stderr lines other than plain progress lines (``progress: ...``, printed while
    a piped run works): what a refusal printed."""
    return [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("progress: ")]


def assert_refused(code: int, err: str, needle: str, src: Path, before: str, out: Path) -> None:
    """A bad input: exit 2, one line naming ``needle``, no traceback, input untouched, no output."""
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert dir_hash(src) == before
