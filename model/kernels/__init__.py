"""Triton kernels for the MemMamba hot paths, each tested against its pure-PyTorch reference.

=================  ==============================  ===============================
kernel file        public function                 reference (ground truth)
=================  ==============================  ===============================
ssd.py             ssd_chunked_triton              model/ssd.py::ssd_chunked
memory.py          memory_read_triton              model/memory.py::memory_read
=================  ==============================  ===============================

The model calls both through attributes (``Mamba2Mixer.ssd_fn``, ``MemoryBlock.read_fn``), and
``apply_kernels`` swaps them. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the
kernels run on CPU tensors in Triton's interpreter, which is how the tests check them without a GPU.
"""

import os

import torch.nn as nn

from model.memory import memory_read
from model.ssd import ssd_chunked

try:
    from .memory import memory_read_triton
    from .ssd import ssd_chunked_triton

    TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # triton missing or broken: the reference path still works
    TRITON_IMPORT_ERROR = error

BACKENDS = ("auto", "triton", "torch")


def apply_kernels(model: nn.Module, backend: str = "auto") -> str:
    """Point every SSD scan and memory read of ``model`` at the chosen implementation.

    Args:
        model: any module tree; submodules with ``ssd_fn`` / ``read_fn`` attributes are switched.
        backend: "auto" picks Triton when the parameters are on CUDA and triton imports, else
            torch; "triton" forces the kernels (on CPU only under TRITON_INTERPRET=1);
            "torch" restores the pure-PyTorch references.

    Returns:
        The backend applied: "triton" or "torch".
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernels: got {backend!r}, expected one of {', '.join(BACKENDS)}")
    on_cuda = any(p.is_cuda for p in model.parameters())
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        backend = "triton" if on_cuda and TRITON_IMPORT_ERROR is None else "torch"
    elif backend == "triton":
        if TRITON_IMPORT_ERROR is not None:
            raise ValueError(f"kernels: 'triton' requested but triton does not import ({TRITON_IMPORT_ERROR})")
        if not on_cuda and not interpreted:
            raise ValueError("kernels: 'triton' needs the model on CUDA (or TRITON_INTERPRET=1 before triton is "
                             "imported, to run the kernels on CPU in Triton's interpreter)")
    use_triton = backend == "triton"
    for module in model.modules():
        if hasattr(module, "ssd_fn"):
            module.ssd_fn = ssd_chunked_triton if use_triton else ssd_chunked
        if hasattr(module, "read_fn"):
            module.read_fn = memory_read_triton if use_triton else memory_read
    return backend


__all__ = ["BACKENDS", "apply_kernels"]
