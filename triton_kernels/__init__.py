"""Triton kernels of lbw-kernels (installed as ``lbw_kernels.triton_kernels``).

Layers, one idea per file: ``chunk_table`` (device-side tables of tensor addresses, cached by
storage) -> kernels (``telemetry``, ``coefficients``, ``guarded_adamw``) -> ``ops`` (plans +
launches, and the ``torch.library`` custom ops torch.compile sees) -> ``backend``
(``TritonBackend``, ``backend="triton"``). ``config`` holds the launch geometry.
Importing this package needs triton but no GPU; kernels compile on first launch.
"""
