"""Count the device launches of a piece of PyTorch code on the CPU.

``LaunchCounter`` is a ``TorchDispatchMode`` that counts the aten ops that would launch work on a
GPU (everything but views, allocation without initialisation and other metadata-only ops) plus
every Triton kernel launch; ops run inside a Triton launch (the interpreter's own) are not
counted.  Used by tests/test_qa_distill_launches.py and by ``benchmarks/bench_loss.py``.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only allocate, alias or describe tensors: no kernel runs on a GPU for them.
METADATA_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_to_copy_no_op", "size", "stride", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "resize_", "record_stream",
}


def _is_metadata(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in METADATA_OPS:
        return True
    # A view returns an alias of an input that it does not write: no data moves.
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: ...`` then ``c.total``, ``c.aten`` and ``c.triton``."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.triton = 0
        self._inside_triton = 0

    @property
    def aten(self) -> int:
        return sum(self.ops.values())

    @property
    def total(self) -> int:
        return self.aten + self.triton

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_triton and not _is_metadata(func):
            self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting_triton(self):
        """Count every Triton launch (compiled or interpreted) made inside the block."""
        from triton.runtime.jit import KernelInterface

        kinds = {cls for cls in _subclasses(KernelInterface) if "run" in cls.__dict__}
        originals = {cls: cls.__dict__["run"] for cls in kinds}
        counter = self

        def wrap(run):
            def counted(self_, *args, **kwargs):
                if kwargs.get("warmup"):
                    return run(self_, *args, **kwargs)
                counter.triton += 1
                counter._inside_triton += 1
                try:
                    return run(self_, *args, **kwargs)
                finally:
                    counter._inside_triton -= 1
            return counted

        for cls, run in originals.items():
            setattr(cls, "run", wrap(run))
        try:
            yield self
        finally:
            for cls, run in originals.items():
                setattr(cls, "run", run)


def _subclasses(cls):
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as c:`` counts aten launches and Triton launches together."""
    counter = LaunchCounter()
    with counter.counting_triton(), counter:
        yield counter
