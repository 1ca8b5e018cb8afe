"""Count the operations that would force a device → host sync on CUDA, on a CPU-only machine.

On a GPU, reading a device value on the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
``.cpu()``, ``.numpy()``) or running an op whose output size depends on device data (``nonzero``,
``masked_select``, boolean indexing, ``unique``) waits for every kernel queued before it. On the CPU the
same code runs without waiting, so nothing shows the stall. :class:`SyncCounter` makes it visible:

* every tensor that the code under test moves "to the device" (``Tensor.to``/``Module.to`` with a device
  argument, while the counter is active) is *marked* and becomes a fresh copy, as a real transfer would;
* a ``TorchDispatchMode`` marks every output of an op that has a marked input, so device-ness spreads
  exactly as it would on a GPU (parameters → activations → loss → gradients → optimizer state);
* an op from :data:`SYNC_OPS` with a marked input, or a host read (``tolist``, ``cpu``, ``numpy``,
  ``item``, ``__bool__``, ...) of a marked tensor, is counted with its name.

Host tensors (the loader's batch, the strategy plan, lengths kept on the host) are never marked, so work
on them is free, as on a GPU. Used by ``bench/host_syncs.py`` and its test.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: aten ops that read device data on the host (or size their output from it) under CUDA.
SYNC_OPS = {
    "aten._local_scalar_dense.default",  # .item(), float(), int(), bool() of a one-element tensor
    "aten.nonzero.default",
    "aten.nonzero_static.default",
    "aten.masked_select.default",
    "aten.unique_dim.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten._assert_async.default",
    "aten.bincount.default",  # sizes its output from the data's maximum
    "aten.histc.default",
}
#: Indexing ops that sync when an index is a boolean mask (it becomes ``nonzero`` inside).
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}
#: Outputs that an op puts on the host even for device inputs (by position in the op's output tuple).
HOST_OUTPUTS = {"aten._pack_padded_sequence.default": (1,)}  # batch_sizes always lives on the CPU
#: Tensor methods that copy device data to the host without an aten op on the CPU.
HOST_READS = ("tolist", "cpu", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter(TorchDispatchMode):
    """Context manager: ``with SyncCounter() as c: step()`` then ``c.total`` and ``c.by_op``."""

    def __init__(self, trace: str | None = None) -> None:
        super().__init__()
        self.trace = trace  # print the Python stack of the first sync whose name contains this
        self._marked: dict[int, weakref.ref] = {}  # id → weak reference (tensors compare elementwise)
        self.by_op: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}
        self._inside = 0  # > 0 while a patched method runs (its own ops are not counted twice)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _count(self, name: str) -> None:
        if self.trace and self.trace in name and not self.by_op[name]:
            import traceback

            print(f"first {name}:\n" + "".join(traceback.format_stack(limit=12)[:-2]))
        self.by_op[name] += 1

    def mark(self, *tensors: torch.Tensor) -> None:
        """Declare tensors as living on the device (e.g. parameters built before the counter started)."""
        for t in tensors:
            self._mark(t)

    def _mark(self, t: torch.Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def is_marked(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(self.is_marked(a) for a in flat)
        name = str(func)
        if on_device and not self._inside:
            if name in SYNC_OPS:
                self._count(name)
            elif name in MASK_INDEXING and _has_bool_index(args):
                self._count(name + " (boolean mask)")
        out = func(*args, **kwargs)
        if on_device:
            host = HOST_OUTPUTS.get(str(func), ())
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for i, item in enumerate(outs):
                if i in host:
                    continue
                for t in tree_flatten(item)[0]:
                    if isinstance(t, torch.Tensor):
                        self._mark(t)
        return out

    # ------------------------------------------------------------------ patched Tensor / Module methods

    def __enter__(self):
        counter = self
        originals = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "to")}
        module_to = torch.nn.Module.to

        def host_read(name):
            original = originals[name]

            def read(t, *a, **k):
                if counter.is_marked(t) and not counter._inside:
                    counter._count(f"Tensor.{name}")
                counter._inside += 1
                try:
                    return original(t, *a, **k)
                finally:
                    counter._inside -= 1

            return read

        def to(t, *a, **k):
            out = originals["to"](t, *a, **k)
            if _names_device(a, k):
                if out is t:  # same device on the CPU: a real transfer would make a copy
                    out = out.clone()
                counter._mark(out)
            return out

        def module_to_marked(module, *a, **k):
            result = module_to(module, *a, **k)
            if _names_device(a, k):
                for p in module.parameters():
                    counter._mark(p)
                for b in module.buffers():
                    counter._mark(b)
            return result

        for name in HOST_READS:
            setattr(torch.Tensor, name, host_read(name))
        torch.Tensor.to = to
        torch.nn.Module.to = module_to_marked
        self._saved = {"tensor": originals, "module_to": module_to}
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved["tensor"].items():
                setattr(torch.Tensor, name, original)
            torch.nn.Module.to = self._saved["module_to"]


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``to(...)`` call names a device (a dtype-only or memory-format call does not move data)."""
    if "device" in kwargs:
        return True
    for a in args:
        if isinstance(a, (torch.device, str)):
            return True
        if isinstance(a, torch.Tensor):  # to(other): takes other's device
            return True
    return False
