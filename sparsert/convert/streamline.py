"""``streamline``: a lean inference forward for Hugging Face BERT-style encoders.

A sparse model is only as fast as the code around its layers. Hugging Face's
``BertModel.forward`` builds its attention mask through several small ops,
dispatches attention through a registry, and calls a module per dropout and
per sub-block: at one sentence of 32 tokens that framework code takes about as
long as all 36 sparse Linear layers of all-MiniLM-L6-v2 (measured:
``benchmarks/RESULTS.md``, Round 15). onnxruntime runs the same model as one
fused graph. :func:`streamline` returns a copy of the model whose forward does
only the arithmetic, with the same modules and weights:

* the embeddings module as is, then per layer: Q, K and V (one fused Linear
  when ``fuse_qkv``), attention, output projection + residual + LayerNorm,
  intermediate + activation, output + residual + LayerNorm; then the pooler;
* the padding mask built once per call, and left out when nothing is padded;
* attention by sparsert's kernel (:func:`sparsert.ops.attention`: q, k and v
  read in place from the fused projection's output, the context written in the
  layout the output projection reads) up to :data:`KERNEL_ATTENTION_MAX_TOKENS`
  tokens, where it measured 1.4-2.4x faster than torch's CPU
  ``scaled_dot_product_attention`` (head size 32, its copies into head-major
  order included), and by torch's kernel beyond;
* Q, K and V as one Linear of three times the width (``fuse_qkv``): one call,
  and one packing of the input for a sparse kernel, instead of three
  (measured 1.26-1.28x for MiniLM's three 70% layers at 32 and 512 tokens).
  Three plain ``nn.Linear`` become one that ``sparsify`` then packs like any
  other (streamline *before* sparsify, so its format is timed as one layer);
  three fp32 sparse layers packed in one format are packed again as one in
  that format; otherwise they stay three.

The result returns the same ``last_hidden_state`` and ``pooler_output`` (equal
to float rounding) and keeps Hugging Face's ``state_dict`` names, except that
a fused layer's entries are ``attention.self.qkv.*``. It runs inference only:
dropout is left out, so it refuses to run in training mode (train the Hugging
Face model, then streamline it). ``sparsert.save`` records the streamlining and
``sparsert.load`` rebuilds it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention as _attention
from ..ops.attention import attention_torch
from .streamline_decoder import StreamlinedDecoder, is_llama_style, rebuild_decoder, streamline_decoder

__all__ = ["FORWARDS", "streamline", "streamlined_or_same", "rebuild", "fuse_linears", "fusion_groups", "StreamlinedEncoder", "StreamlinedDecoder", "KERNEL_ATTENTION_MAX_TOKENS", "ATTENTION_MODES"]

#: Up to this many tokens "auto" attention runs sparsert's kernel (:func:`sparsert.ops.attention`);
#: beyond, ``F.scaled_dot_product_attention``. Measured with 12 heads of 32 on 2 Zen 4 cores
#: (2 threads, sdpa's time over the kernel's, from a fused Q/K/V output, kernel with 4-row blocks):
#: 1 x 32 2.02, 8 x 64 2.38, 1 x 128 2.18, 8 x 128 1.78, 32 x 64 1.83, 1 x 256 1.49, 4 x 256 1.37,
#: 1 x 512 1.46 (BERT-style encoders take at most 512 positions).
KERNEL_ATTENTION_MAX_TOKENS = 512

#: ``attention=`` choices: "auto" (by sequence length, above), "kernel" (sparsert's op at every
#: length), "math" (matmul + softmax + matmul in torch) or "sdpa" (torch's fused kernel).
ATTENTION_MODES = ("auto", "kernel", "math", "sdpa")


def _check_encoder(model: nn.Module) -> None:
    """The structure this forward reproduces; a clear error for anything else."""
    what = type(model).__name__
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if config is None or getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        raise TypeError(f"streamline takes a Hugging Face BERT-style encoder (BertModel, RobertaModel, ...: "
                        f".config, .embeddings, .encoder.layer), got {what}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(f"streamline runs encoders only; this {what} is configured as a decoder "
                         "(is_decoder / add_cross_attention)")
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise ValueError(f"streamline supports absolute position embeddings only; this {what} has "
                         f"position_embedding_type={position!r}")
    if getattr(config, "chunk_size_feed_forward", 0):
        raise ValueError("streamline does not chunk the feed-forward: set config.chunk_size_feed_forward=0")
    for i, layer in enumerate(layers):
        try:
            at = layer.attention
            parts = [at.output.dense, at.output.LayerNorm, layer.intermediate.dense,
                     layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.LayerNorm]
            qkv = getattr(at.self, "qkv", None)
            parts += [qkv] if qkv is not None else [at.self.query, at.self.key, at.self.value]
        except AttributeError as e:
            raise TypeError(f"streamline: layer {i} of this {what} is not a BERT layer ({e})") from None
        if any(p is None for p in parts):
            raise TypeError(f"streamline: layer {i} of this {what} lacks a BERT sub-module")


def _fusable_kind(mods) -> str | None:
    """How Linears of one input can run as one: "linear" (plain ``nn.Linear``), "dense" (sparsert's
    dense-path Linears of one class), a format kind (``SparseLinear`` packed alike, no epilogue), or
    None (they then stay separate calls)."""
    from ..nn import SparseLinear
    from ..nn.modules import DenseLinear, Int8DenseLinear

    types = {type(m) for m in mods}
    if len(types) != 1:
        return None
    (kind,) = types
    if kind is nn.Linear:
        return "linear"
    if kind in (DenseLinear, Int8DenseLinear):
        return "dense"
    if kind is not SparseLinear:
        return None
    kinds = {(m.format, m.activation) for m in mods}
    if len(kinds) != 1:
        return None
    fmt, activation = kinds.pop()
    return fmt if activation is None and fmt != "dense" else None


def fuse_linears(mods) -> nn.Module | None:
    """One Linear computing ``cat([m(x) for m in mods], -1)``: the modules' rows stacked, of the
    same kind (plain ``nn.Linear``; ``DenseLinear``/``Int8DenseLinear``; ``SparseLinear`` packed
    again in its format, int8 ones quantised again per row, which gives back the same integers and
    scales); None where they differ in kind, input width, dtype or device. The inputs are left as
    they are."""
    kind = _fusable_kind(mods)
    if kind is None:
        return None
    w = tuple(m.weight if kind in ("linear", "dense") else m.to_dense().weight for m in mods)
    if len({(t.shape[1], t.dtype, t.device) for t in w}) != 1:
        return None
    dtype, device = w[0].dtype, w[0].device
    rows = [t.shape[0] for t in w]
    with_bias = any(m.bias is not None for m in mods)
    fused = nn.Linear(w[0].shape[1], sum(rows), bias=with_bias, device=device, dtype=dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([t.detach() for t in w]))
        if with_bias:
            fused.bias.copy_(torch.cat([m.bias.detach().to(dtype) if m.bias is not None
                                        else torch.zeros(r, dtype=dtype, device=device)
                                        for m, r in zip(mods, rows)]))
    if kind == "linear":
        return fused.requires_grad_(mods[0].weight.requires_grad)
    if kind == "dense":
        return type(mods[0]).from_linear(fused)
    from ..nn import SparseLinear

    return SparseLinear.from_dense(fused, kind)


def fusion_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The Linears of a streamlined model (built with ``fuse_qkv=False``) that its fused twin runs as
    one call when they are of one kind (:func:`fuse_linears`): per layer Q/K/V (encoders, decoders)
    and gate/up (decoders), as module names of ``model``. Empty for any other model."""
    groups: list[tuple[str, ...]] = []
    if isinstance(model, StreamlinedEncoder):
        for i, layer in enumerate(model.encoder.layer):
            sa = layer.attention.self
            mods = [getattr(sa, n, None) for n in ("query", "key", "value")]
            if all(m is not None for m in mods) and len({getattr(m, "out_features", None) for m in mods}) == 1:
                groups.append(tuple(f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")))
    elif isinstance(model, StreamlinedDecoder):
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
                groups.append(tuple(f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")))
            if (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
                    and getattr(mlp.gate_proj, "out_features", None) == getattr(mlp.up_proj, "out_features", None)):
                groups.append((f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"))
    return [g for g in groups if all(_has_module(model, n) for n in g)]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fuse_qkv(self_attention: nn.Module) -> bool:
    """Replaces query/key/value (three Linears of one input and one width, see :func:`fuse_linears`)
    by ``qkv``, their rows stacked; False where they cannot be fused."""
    q, k, v = mods = self_attention.query, self_attention.key, self_attention.value
    if len({getattr(m, "out_features", None) for m in mods}) != 1:
        return False
    fused = fuse_linears(mods)
    if fused is None:
        return False
    del self_attention.query, self_attention.key, self_attention.value
    self_attention.qkv = fused
    return True


class StreamlinedEncoder(nn.Module):
    """A BERT-style encoder's inference forward without the framework code around its layers.

    Built by :func:`streamline`; holds the model's own ``embeddings``, ``encoder`` and
    ``pooler`` modules (so ``state_dict`` names are Hugging Face's) and its ``config``.
    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)``
    returns a ``BaseModelOutputWithPoolingAndCrossAttentions`` with ``last_hidden_state``
    and ``pooler_output`` (None without a pooler).
    """

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, *, attention: str = "auto", hf_class: str | None = None):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        _check_encoder(model)
        self.config = model.config
        self.embeddings = model.embeddings
        self.encoder = model.encoder
        self.pooler = getattr(model, "pooler", None)
        self.attention = attention
        #: the Hugging Face class this came from (what ``sparsert.save`` records to rebuild it)
        self.hf_class = hf_class or type(model).__name__
        self.num_heads = int(model.config.num_attention_heads)

    @property
    def fused_layers(self) -> list[int]:
        """The layers whose Q, K and V run as one ``qkv`` Linear."""
        return [i for i, layer in enumerate(self.encoder.layer) if hasattr(layer.attention.self, "qkv")]

    @property
    def fused_qkv(self) -> bool:
        """True when every layer's Q, K and V run as one ``qkv`` Linear."""
        return len(self.fused_layers) == len(self.encoder.layer)

    def recipe(self) -> dict:
        """What ``sparsert.save`` records so that :func:`rebuild` makes the same structure."""
        return {"attention": self.attention, "fused_layers": self.fused_layers}

    def _layer_parts(self):
        """Per layer, the modules the forward calls, read from the ``_modules`` dicts on each
        call (``nn.Module.__getattr__`` costs ~1 µs a lookup; sparsify and load swap these
        modules, so nothing is cached)."""
        for layer in self.encoder._modules["layer"]._modules.values():
            parts = layer._modules
            attention = parts["attention"]._modules
            s = attention["self"]._modules
            out = attention["output"]._modules
            mid = parts["intermediate"]
            ffn = parts["output"]._modules
            act = mid._modules.get("intermediate_act_fn")
            if act is None:  # (a function, not a module, where config.hidden_act was one)
                act = mid.__dict__["intermediate_act_fn"]
            # transformers' GELUActivation wraps F.gelu: call that directly
            if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
                act = F.gelu
            yield (s.get("qkv"), s.get("query"), s.get("key"), s.get("value"), out["dense"], out["LayerNorm"],
                   mid._modules["dense"], act, ffn["dense"], ffn["LayerNorm"])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None):
        if self.training:
            raise RuntimeError("a streamlined encoder runs inference only (dropout is left out): call .eval(), "
                               "or train the Hugging Face model before streamline()")
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        batch, tokens, hidden = h.shape
        heads = self.num_heads
        head = hidden // heads
        key_bias = None  # (batch, tokens): 0 for a token, the dtype's lowest for padding
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, tokens):
                raise ValueError(f"attention_mask must have input_ids' shape {(batch, tokens)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):  # padding: an additive mask, built once for every layer
                key_bias = torch.zeros(batch, tokens, dtype=h.dtype, device=h.device)
                key_bias.masked_fill_(attention_mask == 0, torch.finfo(h.dtype).min)
        mode = self.attention
        if mode == "auto":
            mode = "kernel" if tokens <= KERNEL_ATTENTION_MAX_TOKENS else "sdpa"
        mask = None if key_bias is None or mode != "sdpa" else key_bias[:, None, None, :]
        scale = head ** -0.5
        split = (batch, tokens, heads, head)
        for qkv, query, key, value, out_dense, out_norm, mid_dense, act, ffn_dense, ffn_norm in self._layer_parts():
            if qkv is not None:
                q, k, v = qkv(h).split(hidden, dim=-1)  # (views: the kernel reads them in place)
            else:
                q, k, v = query(h), key(h), value(h)
            if mode == "kernel":
                ctx = _attention(q, k, v, key_bias, heads=heads, scale=scale)
            elif mode == "math":
                ctx = attention_torch(q, k, v, key_bias, heads, scale)
            else:
                q, k, v = (t.view(split).transpose(1, 2) for t in (q, k, v))
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
            h = out_norm(out_dense(ctx) + h)
            h = ffn_norm(ffn_dense(act(mid_dense(h))) + h)
        pooled = self.pooler(h) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=pooled)

    def extra_repr(self) -> str:
        return f"hf_class={self.hf_class}, attention={self.attention!r}, fused_layers={self.fused_layers}"


def streamline(model: nn.Module, *, fuse_qkv: bool = True, attention: str = "auto",
               inplace: bool = False) -> "StreamlinedEncoder | StreamlinedDecoder":
    """A :class:`StreamlinedEncoder` over ``model`` (a Hugging Face BERT-style encoder: BertModel,
    RobertaModel, ... with or without sparse layers), for inference.

    ``fuse_qkv``: run each layer's Q, K and V as one Linear where all three are plain
    ``nn.Linear`` (a dense or pruned model before ``sparsify``) or fp32 sparse layers in one
    format (packed again as one; layers in different formats stay three). ``attention``: "auto" (sparsert's kernel up to :data:`KERNEL_ATTENTION_MAX_TOKENS`
    tokens, torch's fused kernel beyond), "kernel", "math" or "sdpa" (:data:`ATTENTION_MODES`). The model is copied unless
    ``inplace`` (then its layers are fused in place and it should not be called again).
    A streamlined model passed again is returned as is (fused further when asked).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if isinstance(model, StreamlinedDecoder) or is_llama_style(model):
        if attention != "auto":
            raise ValueError("attention= chooses an encoder's attention; a decoder's is fixed (pass 'auto')")
        return streamline_decoder(model, fuse=fuse_qkv, inplace=inplace)
    # (a new wrapper holds the model's own modules: checked once, then copied with them)
    out = model if isinstance(model, StreamlinedEncoder) else StreamlinedEncoder(model, attention=attention)
    if not inplace:
        out = copy.deepcopy(out)
    out.attention = attention
    if fuse_qkv:
        for layer in out.encoder.layer:
            if not hasattr(layer.attention.self, "qkv"):
                _fuse_qkv(layer.attention.self)
    return out.eval()


#: how a model is timed and served (the planner's and the serving Engine's ``forward=``):
#: :func:`streamline`'s lean forward where it takes the model, or the model's own ("hf")
FORWARDS = ("streamlined", "hf")


def streamlined_or_same(model: nn.Module, *, fuse_qkv: bool = True) -> nn.Module:
    """``streamline(model)`` (a copy) where it takes the model (a BERT-style encoder or a LLaMA-style
    causal LM, not already streamlined), else ``model`` itself: how the Engine and the planner run a
    model they were given. A streamlined model passed in is returned as is."""
    if isinstance(model, (StreamlinedEncoder, StreamlinedDecoder)):
        return model
    try:
        return streamline(model, fuse_qkv=fuse_qkv)
    except (TypeError, ValueError):  # not a structure streamline reproduces: the model's own forward
        return model


def rebuild(model: nn.Module, recipe) -> StreamlinedEncoder:
    """``model`` (a freshly built Hugging Face encoder or causal LM, e.g. a file's skeleton)
    streamlined in place as its wrapper's ``recipe()`` says; ValueError for a recipe that does not fit."""
    if isinstance(recipe, dict) and "decoder" in recipe:
        return rebuild_decoder(model, recipe)
    if not isinstance(recipe, dict) or set(recipe) != {"attention", "fused_layers"}:
        raise ValueError("a streamline recipe is {'attention': ..., 'fused_layers': [...]}")
    fused, n = recipe["fused_layers"], len(getattr(getattr(model, "encoder", None), "layer", []))
    if not isinstance(fused, list) or not all(isinstance(i, int) and 0 <= i < n for i in fused):
        raise ValueError(f"fused_layers must list layer indices in [0, {n})")
    out = streamline(model, fuse_qkv=False, attention=recipe["attention"], inplace=True)
    for i in sorted(set(fused)):
        if not _fuse_qkv(out.encoder.layer[i].attention.self):
            raise ValueError(f"layer {i}'s query, key and value cannot be fused")
    return out
