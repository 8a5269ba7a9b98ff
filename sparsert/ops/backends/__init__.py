"""Native backends of the ``torch.ops.sparsert`` ops: ``cpu`` (``sparsert._C``, always
registered) and ``cuda`` (``sparsert._C_cuda``, registered when torch sees a GPU); and
``best_dense``, the fastest dense Linear torch offers here (oneDNN prepacked), for the
layers left dense and as every benchmark's baseline."""
