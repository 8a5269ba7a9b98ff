"""Native backends of the ``torch.ops.sparsert`` ops: ``cpu`` (``sparsert._C``, always
registered) and ``cuda`` (``sparsert._C_cuda``, registered when torch sees a GPU)."""
