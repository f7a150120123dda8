"""Triton kernels of the op contract (backend name ``"triton"``).

Each ``<op>.py`` holds the ``@triton.jit`` kernels and their ``*_forward`` / ``*_backward``
launchers; the public ops in ``usfmae_fast.ops`` wrap them as torch custom ops. ``_utils``
tells whether Triton can run here (a CUDA device, or ``TRITON_INTERPRET=1`` on CPU tensors).
"""
