"""A lean inference forward for Hugging Face LLaMA-style causal LMs (the decoder half of ``streamline``).

Decoding one token of SmolLM2-135M through Hugging Face's ``generate`` took about
20 ms here with int8 sparse layers, of which the Linear kernels took ~6 ms: the
rest was the framework around them (a cache object that concatenates keys and
values every step, a causal mask built per call, attention dispatched through a
registry, rotary embeddings applied per layer, ``generate``'s logits processors).
:class:`StreamlinedDecoder` runs the same modules and weights with only the
arithmetic:

* embeddings; per layer RMSNorm, Q/K/V (one fused Linear where they can be),
  rotary embeddings applied to q and k at once, keys and values written in
  place into a preallocated :class:`KVCache`, attention (grouped heads read
  the shared keys without copies), output projection + residual, RMSNorm,
  gate and up (one fused Linear), ``silu(gate) * up``, down + residual; the
  final norm and ``lm_head`` on the last ``logits_to_keep`` positions only;
* :meth:`StreamlinedDecoder.generate`: greedy decoding in a plain loop.

It returns Hugging Face's ``logits`` (equal to float rounding: tests compare in
float64) and keeps the ``state_dict`` names, except fused layers:
``self_attn.qkv.*`` and ``mlp.gate_up.*``. Inference only, unpadded batches.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._threads import get_num_threads
from ..ops.decoder import cached_attention, native_decoder_ops, rms_norm, swiglu, swiglu_torch

__all__ = ["StreamlinedDecoder", "KVCache", "streamline_decoder", "rebuild_decoder", "is_llama_style"]

#: Hugging Face model types whose decoder layers this forward reproduces exactly
#: (pre-norm RMSNorm, rotary q/k, grouped-query attention, SwiGLU MLP, no q/k norms).
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2")
#: RMSNorm classes that compute ``weight * x / sqrt(mean(x^2) + eps)`` (F.rms_norm's formula).
_PLAIN_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def is_llama_style(model: nn.Module) -> bool:
    """True for a Hugging Face ``...ForCausalLM`` of a LLaMA-style family (:data:`LLAMA_STYLE_TYPES`)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in LLAMA_STYLE_TYPES and \
        hasattr(getattr(model, "model", None), "layers") and hasattr(model, "lm_head")


def _check_decoder(model: nn.Module) -> None:
    what = type(model).__name__
    if not is_llama_style(model):
        raise TypeError(f"streamline takes a Hugging Face LLaMA-style causal LM ({', '.join(LLAMA_STYLE_TYPES)}: "
                        f".model.layers, .lm_head), got {what}")
    config = model.config
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        raise ValueError(f"streamline does not reproduce sliding-window attention ({what}.config.sliding_window)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"streamline's decoder runs SwiGLU with silu; this {what} has hidden_act="
                         f"{config.hidden_act!r}")
    for i, layer in enumerate(model.model.layers):
        try:
            a, mlp = layer.self_attn, layer.mlp
            parts = [a.o_proj, mlp.down_proj, layer.input_layernorm, layer.post_attention_layernorm]
            parts += [a.qkv] if hasattr(a, "qkv") else [a.q_proj, a.k_proj, a.v_proj]
            parts += [mlp.gate_up] if hasattr(mlp, "gate_up") else [mlp.gate_proj, mlp.up_proj]
        except AttributeError as e:
            raise TypeError(f"streamline: layer {i} of this {what} is not a LLaMA decoder layer ({e})") from None
        if any(p is None for p in parts):
            raise TypeError(f"streamline: layer {i} of this {what} lacks a LLaMA sub-module")
        if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
            raise ValueError(f"streamline does not reproduce q/k norms (layer {i} of this {what})")


class KVCache:
    """Every layer's keys and values, preallocated and written in place.

    One tensor ``(layers, 2, batch, kv_heads, capacity, head_dim)``; ``length`` positions
    are filled. It grows (doubling, one copy) when a call needs more room, so a decode
    step writes one position instead of concatenating the whole history (what Hugging
    Face's ``DynamicCache`` does per layer per step).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, *, dtype=torch.float32,
                 device=None, capacity: int = 128):
        self.store = torch.empty(layers, 2, batch, kv_heads, max(1, capacity), head_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.store.shape[2]

    @property
    def capacity(self) -> int:
        return self.store.shape[4]

    def get_seq_length(self, layer: int = 0) -> int:
        """Positions filled (Hugging Face's ``Cache`` name for it)."""
        return self.length

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions (grows to the next power of two at least twice the old room)."""
        if length <= self.capacity:
            return
        grown = max(length, 2 * self.capacity)
        grown = 1 << (grown - 1).bit_length()
        s = self.store
        store = torch.empty(*s.shape[:4], grown, s.shape[5], dtype=s.dtype, device=s.device)
        store[..., : self.length, :] = s[..., : self.length, :]
        self.store = store

    def __len__(self) -> int:
        return self.length


def _rotate_sign(head_dim: int, dtype, device) -> Tensor:
    """``[-1] * (d/2) + [1] * (d/2)``: ``rotate_half(x) == x.roll(d/2, -1) * sign``."""
    half = head_dim // 2
    return torch.cat([torch.full((half,), -1.0), torch.ones(head_dim - half)]).to(dtype=dtype, device=device)


class StreamlinedDecoder(nn.Module):
    """A LLaMA-style causal LM's inference forward without the framework code around its layers.

    Built by ``sparsert.streamline(model)``; holds the model's own ``model`` (embeddings,
    layers, norm, rotary embedding) and ``lm_head`` modules, so ``state_dict`` names are
    Hugging Face's. ``forward(input_ids, attention_mask=None, cache=None, use_cache=False,
    logits_to_keep=0)`` returns a ``CausalLMOutputWithPast`` with ``logits`` and ``cache``
    (a :class:`KVCache` when ``use_cache``); :meth:`generate` decodes greedily.
    """

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, *, hf_class: str | None = None):
        super().__init__()
        _check_decoder(model)
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.model = model.model
        self.lm_head = model.lm_head
        self.hf_class = hf_class or type(model).__name__
        c = model.config
        self.num_heads = int(c.num_attention_heads)
        self.num_kv_heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        self.head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not share {self.num_kv_heads} key/value heads evenly")

    def can_generate(self) -> bool:
        return True

    # -- structure -------------------------------------------------------------
    @property
    def fused_qkv_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if hasattr(layer.self_attn, "qkv")]

    @property
    def fused_gate_up_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if hasattr(layer.mlp, "gate_up")]

    def recipe(self) -> dict:
        """What ``sparsert.save`` records so that :func:`rebuild_decoder` makes the same structure."""
        return {"decoder": "llama", "fused_qkv": self.fused_qkv_layers, "fused_gate_up": self.fused_gate_up_layers}

    def new_cache(self, batch: int, capacity: int = 128) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(len(self.model.layers), batch, self.num_kv_heads, self.head_dim, dtype=w.dtype,
                       device=w.device, capacity=capacity)

    def _layer_parts(self):
        """Per layer the modules the forward calls, read from the ``_modules`` dicts on each call
        (``nn.Module.__getattr__`` costs ~1 µs a lookup; sparsify and load swap these modules)."""
        for layer in self.model._modules["layers"]._modules.values():
            parts = layer._modules
            a = parts["self_attn"]._modules
            mlp = parts["mlp"]._modules
            yield (parts["input_layernorm"], a.get("qkv"), a.get("q_proj"), a.get("k_proj"), a.get("v_proj"),
                   a["o_proj"], parts["post_attention_layernorm"], mlp.get("gate_up"), mlp.get("gate_proj"),
                   mlp.get("up_proj"), mlp["down_proj"])

    # -- forward ---------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, past_key_values: KVCache | None = None,
                position_ids: Tensor | None = None):
        if self.training:
            raise RuntimeError("a streamlined decoder runs inference only: call .eval(), or train the Hugging "
                               "Face model before streamline()")
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if cache is None:
            cache = past_key_values
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, (cache.length if cache is not None else 0) + tokens) \
                    and tuple(attention_mask.shape) != (batch, tokens):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, not input_ids' "
                                 f"{(batch, tokens)}")
            if not bool(attention_mask.all()):
                raise ValueError("a streamlined decoder runs unpadded batches: give every sequence the same "
                                 "length (or run them one at a time)")
        if position_ids is not None:
            raise ValueError("a streamlined decoder numbers positions itself (from the cache's length)")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from this model (new_cache()), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache(batch, capacity=max(128, tokens))
        if cache is not None and cache.batch != batch:
            raise ValueError(f"the cache holds {cache.batch} sequences, input_ids {batch}")
        start = cache.length if cache is not None else 0
        x = self._layers(input_ids, cache, start)  # (after the final norm)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def _layers(self, input_ids: Tensor, cache: KVCache | None, start: int) -> Tensor:
        """The layers and the final norm: the normed hidden states of every position."""
        batch, tokens = input_ids.shape
        end = start + tokens
        if cache is not None:
            cache.reserve(end)
        h = self.model.embed_tokens(input_ids)  # (a new tensor: the native path adds into it in place)
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        group = heads // kv_heads
        positions = torch.arange(start, end, device=h.device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(h, positions)  # (1, tokens, d): the model's own (rope scaling included)
        parts = list(self._layer_parts())
        norms = [p[0] for p in parts] + [self.model.norm]  # every layer's first norm, then the final one
        # float32 on the CPU with plain RMSNorms: the residual add + norm, SwiGLU and a decode step's
        # attention run as one native call each (sparsert.ops.decoder); else the same math in torch
        native = native_decoder_ops(h) and all(type(n).__name__ in _PLAIN_RMS_NORMS for n in norms)
        store = cache.store if cache is not None else None
        step = native and tokens == 1 and store is not None
        if step:
            cos_row, sin_row = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        else:
            sin = sin * _rotate_sign(d, sin.dtype, sin.device)  # rotate_half(x) == x.roll(d/2) * sign
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q_width, kv_width = heads * d, kv_heads * d
        scale = self.head_dim ** -0.5
        causal = None
        if tokens > 1 and start > 0:  # new queries see the cached positions and the new ones up to their own
            causal = torch.ones(tokens, end, dtype=torch.bool, device=h.device).tril(start)
        # (native: the norms, SwiGLU and attention write into buffers of this call, each overwritten
        # once the Linear that read it has run; torch.empty per op costs more than these ops at 1 token)
        threads = get_num_threads()
        buffers = (torch.empty_like(h), torch.empty(batch * tokens, q_width), {}) if native else (None, None, {})
        x = _norm(norms[0], h, None, native, buffers[0], threads)
        for i, (_, qkv, q_proj, k_proj, v_proj, o_proj, norm2, gate_up, gate, up, down) in enumerate(parts):
            if qkv is not None:
                projected = qkv(x)
            else:
                projected = torch.cat([q_proj(x), k_proj(x), v_proj(x)], dim=-1)
            if step:  # rotary, the cache write and the attention over the cache: one call
                ctx = cached_attention(projected.view(batch, -1), cos_row, sin_row, store[i, 0], store[i, 1], start,
                                       heads=heads, kv_heads=kv_heads, scale=scale, out=buffers[1],
                                       num_threads=threads).view(batch, 1, q_width)
            else:
                ctx = self._attention(projected, cos, sin, store, i, start, end, causal, scale)
            x, h = _norm(norm2, h, o_proj(ctx), native, buffers[0], threads)
            if gate_up is not None:
                up_out = gate_up(x)
                if native:
                    width = up_out.shape[-1] // 2
                    out = buffers[2].get(width)
                    if out is None:
                        out = buffers[2][width] = torch.empty(batch, tokens, width)
                    act = swiglu(up_out, out=out, num_threads=threads)
                else:
                    act = swiglu_torch(up_out)
            else:
                act = F.silu(gate(x)).mul_(up(x))
            x, h = _norm(norms[i + 1], h, down(act), native, buffers[0], threads)
        if cache is not None:
            cache.length = end
        return x

    def _attention(self, projected: Tensor, cos: Tensor, sin: Tensor, store: Tensor | None, layer: int, start: int,
                   end: int, causal: Tensor | None, scale: float) -> Tensor:
        """Attention in torch: rotary on q and k at once, the cache written, torch's kernels."""
        batch, tokens, _ = projected.shape
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        group, q_width, kv_width = heads // kv_heads, heads * d, kv_heads * d
        qk = projected[..., : q_width + kv_width].view(batch, tokens, heads + kv_heads, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)  # x * cos + rotate_half(x) * sin
        q = qk[:, :, :heads]
        k = qk[:, :, heads:].transpose(1, 2)  # (batch, kv_heads, tokens, d)
        v = projected[..., q_width + kv_width:].view(batch, tokens, kv_heads, d).transpose(1, 2)
        if store is not None:
            store[layer, 0, :, :, start:end] = k
            store[layer, 1, :, :, start:end] = v
            k, v = store[layer, 0, :, :, :end], store[layer, 1, :, :, :end]
        if tokens == 1:  # a decode step: each key/value head serves its group of query heads, no copies
            scores = torch.matmul(q.reshape(batch, kv_heads, group, d), k.transpose(-1, -2)).mul_(scale)
            return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(batch, 1, q_width)
        ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=causal, is_causal=causal is None,
                                             scale=scale, enable_gqa=group > 1)
        return ctx.transpose(1, 2).reshape(batch, tokens, q_width)

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, *, min_new_tokens: int = 0,
                 eos_token_id: "int | list[int] | None" = None, pad_token_id: int | None = None,
                 attention_mask: Tensor | None = None, **unused) -> Tensor:
        """Greedy decoding with the KV cache: ``input_ids`` followed by up to ``max_new_tokens``
        tokens, stopping when every sequence has produced an end token (after ``min_new_tokens``);
        finished sequences are padded with ``pad_token_id`` (else their end token). The
        keywords ``do_sample`` (False only) and ``use_cache`` are accepted for Hugging Face's
        calling convention."""
        if unused.get("do_sample"):
            raise ValueError("StreamlinedDecoder.generate decodes greedily (do_sample=False); sample with "
                             "sparsert.serving's Engine or your own loop over forward()")
        extra = set(unused) - {"do_sample", "use_cache"}
        if extra:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(extra)}")
        if max_new_tokens < 0 or min_new_tokens < 0:
            raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a streamlined decoder runs unpadded batches")
        if eos_token_id is None and self.generation_config is not None:
            eos_token_id = self.generation_config.eos_token_id
        ends = torch.tensor([] if eos_token_id is None else
                            (list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]),
                            dtype=torch.int64)
        pad = pad_token_id if pad_token_id is not None else (int(ends[0]) if len(ends) else 0)
        batch = input_ids.shape[0]
        cache = self.new_cache(batch, capacity=input_ids.shape[1] + max_new_tokens)
        out = [input_ids]
        done = torch.zeros(batch, dtype=torch.bool)
        step = input_ids
        for n in range(max_new_tokens):
            logits = self(step, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if n < min_new_tokens and len(ends):
                logits[:, ends] = float("-inf")
            token = logits.argmax(-1)
            out.append(torch.where(done, torch.full_like(token, pad), token)[:, None])
            if len(ends):
                done |= torch.isin(token, ends)
                if bool(done.all()):
                    break
            step = token[:, None]  # (finished rows go on with their own token: any id the model takes)
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return (f"hf_class={self.hf_class}, fused_qkv_layers={self.fused_qkv_layers}, "
                f"fused_gate_up_layers={self.fused_gate_up_layers}")


def _norm(norm: nn.Module, h: Tensor, add: Tensor | None, native: bool, out: Tensor | None = None,
          threads: int = 0):
    """``norm(h + add)`` and ``h + add`` (just ``norm(h)`` without ``add``): natively into ``out``,
    ``h`` updated in place, when ``native``; else the module (which computes in float32 whatever the
    dtype, as Hugging Face's does)."""
    if native:
        x = rms_norm(h, norm._parameters["weight"], norm.variance_epsilon, add=add, out=out, num_threads=threads)
        return x if add is None else (x, h)
    if add is None:
        return norm(h)
    h = h + add
    return norm(h), h


def streamline_decoder(model: nn.Module, *, fuse: bool = True, inplace: bool = False) -> StreamlinedDecoder:
    """A :class:`StreamlinedDecoder` over ``model`` (see :func:`sparsert.streamline`)."""
    from .streamline import fuse_linears

    out = model if isinstance(model, StreamlinedDecoder) else StreamlinedDecoder(model)
    if not inplace:
        out = copy.deepcopy(out)
    if fuse:
        for layer in out.model.layers:
            _fuse_attention(layer.self_attn, fuse_linears)
            _fuse_mlp(layer.mlp, fuse_linears)
    return out.eval()


def _fuse_attention(attn: nn.Module, fuse_linears) -> bool:
    if hasattr(attn, "qkv"):
        return True
    fused = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    if fused is None:
        return False
    del attn.q_proj, attn.k_proj, attn.v_proj
    attn.qkv = fused
    return True


def _fuse_mlp(mlp: nn.Module, fuse_linears) -> bool:
    if hasattr(mlp, "gate_up"):
        return True
    if mlp.gate_proj.out_features != mlp.up_proj.out_features:
        return False
    fused = fuse_linears([mlp.gate_proj, mlp.up_proj])
    if fused is None:
        return False
    del mlp.gate_proj, mlp.up_proj
    mlp.gate_up = fused
    return True


def rebuild_decoder(model: nn.Module, recipe) -> StreamlinedDecoder:
    """``model`` (a freshly built Hugging Face causal LM) streamlined in place as
    :meth:`StreamlinedDecoder.recipe` says; ValueError for a recipe that does not fit."""
    from .streamline import fuse_linears

    keys = {"decoder", "fused_qkv", "fused_gate_up"}
    if not isinstance(recipe, dict) or set(recipe) != keys or recipe["decoder"] != "llama":
        raise ValueError("a decoder streamline recipe is {'decoder': 'llama', 'fused_qkv': [...], "
                         "'fused_gate_up': [...]}")
    n = len(getattr(getattr(model, "model", None), "layers", []))
    for key in ("fused_qkv", "fused_gate_up"):
        ids = recipe[key]
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < n for i in ids):
            raise ValueError(f"{key} must list layer indices in [0, {n})")
    out = streamline_decoder(model, fuse=False, inplace=True)
    for i in sorted(set(recipe["fused_qkv"])):
        if not _fuse_attention(out.model.layers[i].self_attn, fuse_linears):
            raise ValueError(f"layer {i}'s q, k and v projections cannot be fused")
    for i in sorted(set(recipe["fused_gate_up"])):
        if not _fuse_mlp(out.model.layers[i].mlp, fuse_linears):
            raise ValueError(f"layer {i}'s gate and up projections cannot be fused")
    return out
