"""``sparsify``: swap a pruned model's layers for sparse ones, choosing each layer's format by timing.

```python
sparse = sparsert.sparsify(model, example_inputs=(x,))   # format="auto"
print(sparse.sparsity_plan)                               # per-layer table
```

For every ``nn.Linear`` / ``nn.Conv2d`` whose weight holds zeros, ``"auto"``
times the candidate formats (dense, CSR, every BSR block shape the zero
pattern actually has, N:M when it fits) on the layer's real input, captured
from ``example_inputs`` with forward hooks, and keeps the fastest; a layer
stays dense unless a sparse format beats dense by ``min_speedup`` (and, untimed,
when more than 90% of its weights are nonzero: no format can pay there). Each
candidate's output is checked against the dense layer before it can be
chosen, and the whole converted model is checked against the original on
``example_inputs``. The original model is never left half-converted: by
default a copy is converted; with ``inplace=True`` every swap is rolled back
on error.

The parts: :mod:`~sparsert.convert.plan` (candidate formats, the per-layer
decisions), :mod:`~sparsert.convert.timing` (running and timing),
:mod:`~sparsert.convert.batchnorm` (BatchNorm folding),
:mod:`~sparsert.convert.sparsify` and :mod:`~sparsert.convert.streamline` (a lean
inference forward for BERT-style encoders); module swaps are :mod:`sparsert.nn.surgery`.
"""

from __future__ import annotations

from .batchnorm import fold_batchnorm
from .plan import LayerDecision, SparsityPlan, candidate_formats
from .sparsify import DEFAULT_TOKENS, int8_dense, sparsify
from .streamline import StreamlinedEncoder, streamline
from .streamline_decoder import KVCache, StreamlinedDecoder
from .timing import call_model

__all__ = ["sparsify", "SparsityPlan", "LayerDecision", "fold_batchnorm", "call_model",
           "candidate_formats", "DEFAULT_TOKENS", "int8_dense", "streamline", "StreamlinedEncoder",
           "StreamlinedDecoder", "KVCache"]
