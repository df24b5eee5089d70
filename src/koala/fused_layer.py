"""Llama-family decoder layers in three C calls on CPU: the same bits as their own forward, far less Python.

A one-token SmolLM2 step spent about as long in Python as in arithmetic: ~8,000 Python calls per forward (module
calls, views, RoPE's slices and concatenations, residual adds) beside ~22 ms of kernels (docs/benchmark.md, round
9). `use_fused_layers` gives every decoder layer whose linears and norms already run on koala's C kernels a forward
of three calls (norm + q/k/v + RoPE; o_proj + residual + norm + gate/up; down + residual) around the parts that
stay in Python: the KV cache update and the attention (through transformers' interfaces, so any cache, tree masks
and fresh prompts work as before) and the activation (the module's own, e.g. torch's SiLU). The C side rounds each
intermediate where the module's separate tensor ops round it, so the output is bit-identical; each layer is checked
against its own forward on probes at load, and one that differs (another architecture: extra norms, q/k norms,
partial RoPE, ...) keeps its own forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from koala import cpu_kernels
from koala.invariant_linear import c_kernel, use_invariant_linears

_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def _linear(module: torch.nn.Module, kind: int) -> tuple[int, int | None, int]:
    """(packed weight, fp32 bias or None) pointers and the weight kind of a linear running on koala's C kernel
    with weights of `kind` (or a GGUF's codes standing for bf16 ones), else KeyError."""
    kernel = c_kernel(module)
    if kernel is None:
        raise KeyError("not on koala's linear kernel")
    codes = kind == cpu_kernels.KINDS[torch.bfloat16] and kernel.kind in cpu_kernels.BLOCK_BYTES
    if not (kernel.kind == kind or codes):
        raise KeyError("not on koala's linear kernel")
    return kernel.packed.data_ptr(), None if kernel.bias is None else kernel.bias.data_ptr(), kernel.kind


def _norm(module: torch.nn.Module, kind: int) -> tuple[int, float]:
    """(weight pointer, eps) of a norm running on koala's RMSNorm kernel with a weight of `kind`, else KeyError."""
    weight = getattr(getattr(module, "forward", None), "weight", None)
    if weight is None or cpu_kernels.KINDS.get(weight.dtype) != kind:
        raise KeyError("not on koala's norm kernel")
    return weight.data_ptr(), module.forward.eps


@dataclass(frozen=True)
class Parts:
    """What a fused layer's C calls read: kinds, packed-weight and bias pointers, norm eps, the activation module
    and sizes (heads, kv_heads, head_dim, inter, hidden); koala.fused_body runs whole stacks of layers on these."""
    kind: int
    wkind: int
    weights: tuple[int, ...]  # norm 1, q, k, v, o, norm 2, gate, up, down
    biases: tuple[int | None, ...]  # q, k, v, o, gate, up, down
    eps: tuple[float, float]
    act: torch.nn.Module
    sizes: tuple[int, int, int, int, int]
    scale: float


def fused_forward(layer: torch.nn.Module) -> Callable | None:
    """A forward for a Llama-style decoder layer on koala's kernels, or None where its modules are not that
    (no bits are checked here: see use_fused_layers)."""
    lib = cpu_kernels.library()
    own = type(layer).forward.__get__(layer)
    try:
        attn, mlp, dtype = layer.self_attn, layer.mlp, layer.input_layernorm.weight.dtype
        kind = cpu_kernels.KINDS[dtype]
        (wq, bq, wkind), (wk, bk, _), (wv, bv, _), (wo, bo, _), (wg, bg, _), (wu, bu, _), (wd, bd, _) = linears = [
            _linear(layer.get_submodule(name), kind) for name in _PARTS]
        if len({w for *_, w in linears}) > 1:  # one weight kind per layer: the C calls take one
            return None
        (w1, eps1), (w2, eps2) = _norm(layer.input_layernorm, kind), _norm(layer.post_attention_layernorm, kind)
        d, act = int(attn.head_dim), mlp.act_fn
        heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        inter, layer_idx = mlp.gate_proj.out_features, attn.layer_idx
    except (AttributeError, KeyError, TypeError):
        return None

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        interface = ALL_ATTENTION_FUNCTIONS.get(attn.config._attn_implementation)
        if hidden_states.dtype != dtype or interface is None or position_embeddings is None or layer.training:
            return own(hidden_states, attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                       position_embeddings=position_embeddings, **kwargs)
        x = hidden_states.contiguous()
        b, n, hidden = x.shape
        cos, sin = (t.contiguous() for t in position_embeddings)
        q, k, v = x.new_empty(b, n, heads, d), x.new_empty(b, n, kv_heads, d), x.new_empty(b, n, kv_heads, d)
        _check(lib.koala_attn_in(x.data_ptr(), kind, wkind, w1, eps1, wq, bq, wk, bk, wv, bv, cos.data_ptr(),
                                 sin.data_ptr(), int(cos.shape[0] > 1), q.data_ptr(), k.data_ptr(), v.data_ptr(), b,
                                 n, hidden, heads, kv_heads, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # the views transformers makes
        kwargs = dict(kwargs, position_ids=position_ids, use_cache=use_cache)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx, kwargs=kwargs)
        a = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)[0]
        a = a.reshape(b * n, heads * d).contiguous()
        r, g, u = torch.empty_like(x), x.new_empty(b, n, inter), x.new_empty(b, n, inter)
        _check(lib.koala_attn_out(a.data_ptr(), kind, wkind, wo, bo, x.data_ptr(), r.data_ptr(), w2, eps2, wg, bg,
                                  wu, bu, g.data_ptr(), u.data_ptr(), b * n, heads * d, hidden, inter))
        m = (act(g) * u).contiguous()
        _check(lib.koala_mlp_out(m.data_ptr(), kind, wkind, wd, bd, r.data_ptr(), b * n, inter, hidden))
        return r

    # the C calls get raw pointers: hold what they point into (packed weights, biases, norm weights)
    forward.buffers = [layer.get_submodule(name).forward.kernel for name in _PARTS] + [
        layer.input_layernorm.forward, layer.post_attention_layernorm.forward]
    forward.parts = Parts(kind, wkind, (w1, wq, wk, wv, wo, w2, wg, wu, wd), (bq, bk, bv, bo, bg, bu, bd), (eps1, eps2),
                          act, (heads, kv_heads, d, inter, attn.q_proj.in_features), float(attn.scaling))
    return forward


def _check(status: int) -> None:
    if status:
        raise MemoryError("koala's fused layer could not allocate its scratch memory")


@torch.inference_mode()
def _same_bits(layer: torch.nn.Module, forward: Callable) -> bool:
    """Whether `forward` gives the layer's own outputs bit for bit on probes: a 5-token prompt (nothing cached),
    then 3 tokens on top of it, two batch rows with their own positions (the fused parts run around the cache and
    the attention both paths share)."""
    attn, own = layer.self_attn, type(layer).forward.__get__(layer)
    hidden, d = layer.input_layernorm.weight.shape[0], attn.head_dim
    dtype = layer.input_layernorm.weight.dtype
    gen = torch.Generator().manual_seed(0)
    caches = DynamicCache(), DynamicCache()
    outs = ([], [])
    for n, start in ((5, 0), (3, 5)):
        x = torch.randn(2, n, hidden, generator=gen).to(dtype)
        angles = torch.arange(start, start + n)[None, :, None] * torch.rand(2, 1, d, generator=gen)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        for run, cache, out in zip((own, forward), caches, outs):
            try:
                out.append(run(x, None, cache=cache, use_cache=True, position_embeddings=(cos, sin)))
            except (RuntimeError, TypeError, ValueError):  # a layer this forward does not fit
                return False
    return all(torch.equal(a, b) for a, b in zip(*outs))


@torch.inference_mode()
def use_fused_layers(model: torch.nn.Module) -> int:
    """Give every decoder layer of a frozen CPU model whose linears and norms run on koala's kernels a fused forward
    (see the module), after checking its bits on probes; returns how many layers got one."""
    if cpu_kernels.library() is None:
        return 0
    count = 0
    for module in model.modules():
        if not hasattr(module, "self_attn") or not hasattr(module, "mlp"):
            continue
        forward = fused_forward(module)
        if forward is not None and _same_bits(module, forward):
            module.forward = forward
            count += 1
    return count


def use_cpu_kernels(model: torch.nn.Module, codes: dict[str, tuple[int, torch.Tensor]] | None = None) -> None:
    """Everything koala's CPU kernels give a frozen model (a target or a draft head), in the order that works: the
    linears (on a GGUF's `codes` where given: koala.gguf_codes), then the norms, then the fused layers that call
    both."""
    use_invariant_linears(model, codes)  # rows independent of the row count, and faster (see the module)
    cpu_kernels.use_kernel_norms(model)
    use_fused_layers(model)  # the same bits with a tenth of the Python calls
