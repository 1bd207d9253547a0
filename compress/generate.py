"""``compress generate``: text from a (compressed) causal LM, served through the shared kernels.

The model is rebuilt by :func:`compress.load` (every compressed module serves its ``forward``
through the kernel dispatcher) and driven by ``transformers``' ``generate`` with a KV cache; the
tokenizer (and its chat template, with ``chat=True``) comes from the model directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.arch import remote_code_trusted
from compress.errors import CompressError


@dataclass
class Generation:
    """The completion and how it was produced."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    served_by: str


def _tokenizer(model_dir: Path):  # noqa: ANN202
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
    except (OSError, ValueError) as e:
        raise CompressError(f"{model_dir} has no usable tokenizer ({type(e).__name__})",
                            "copy the source model's tokenizer files into it") from None


def _check_options(prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompt.strip():
        raise CompressError("the prompt is empty", "pass some text to continue")
    if max_new_tokens < 1:
        raise CompressError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", "e.g. --max-new-tokens 64")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise CompressError(f"bad sampling settings (temperature {temperature}, top-p {top_p})",
                            "use a temperature > 0 and 0 < top-p <= 1")


def encode_prompt(tok, prompt: str, chat: bool) -> torch.Tensor:  # noqa: ANN001
    """Token ids ``[1, T]`` of the prompt, wrapped in the chat template when ``chat``."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise CompressError("this tokenizer has no chat template", "drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.inference_mode()
def generate(model: str | Path, prompt: str, *, max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, chat: bool = False,
             device: str | None = None, device_map: str | dict | None = None) -> Generation:
    """Continue ``prompt`` with ``model`` (greedy by default) and return the new text.

    ``device`` (default CPU) or ``device_map`` (placed by ``accelerate``, see :func:`compress.load`;
    the prompt goes to the embedding's device) say where it runs."""
    from transformers import GenerationConfig

    from compress.api import load
    from compress.assets import resolve_model
    from compress.modules.flat_attention import code_cache
    from compress.placement import input_device, main_device

    _check_options(prompt, max_new_tokens, temperature, top_p)
    model_dir = resolve_model(str(model))
    tok = _tokenizer(model_dir)
    lm = load(model_dir, device=device, device_map=device_map)
    if not lm.compress_adapter.causal or not lm.can_generate():
        raise CompressError(f"{model_dir} is not a causal language model ({lm.config.model_type})",
                            "generate needs a decoder such as smollm2-135m")
    ids = encode_prompt(tok, prompt, chat).to(input_device(lm))
    eos = tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                           **({"temperature": temperature, "top_p": top_p} if sample else {}))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    cache = code_cache(lm)  # FlatQuant's KV quantisation: keep the codes, not the values
    extra = {} if cache is None else {"past_key_values": cache}
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **extra)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]  # [new_tokens]
    return Generation(text=tok.decode(new, skip_special_tokens=True), prompt_tokens=int(ids.shape[1]),
                      new_tokens=int(new.numel()), seconds=seconds, served_by=_served_by(lm, str(main_device(lm))))


def _served_by(model: torch.nn.Module, device: str) -> str:
    """What ran the linears: the kernel backend, or plain torch for a model with nothing compressed."""
    from compress.bench import device_label
    from compress.modules.protocol import validatable_modules

    where = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
    placed = f"; device map over {', '.join(where)}" if where else ""
    if validatable_modules(model):
        return device_label(device) + placed
    return f"{device_label(device).split(',')[0]}, dense torch (no compressed modules){placed}"
