"""Peak memory of tensors while a piece of code runs, on a GPU or on the CPU.

On CUDA this is the caching allocator's own statistic. The CPU allocator keeps none, and a process's RSS mixes in
the interpreter, the libraries and freed pages the C allocator has not returned yet; so on the CPU the storages
that PyTorch operators create are counted as they appear (a dispatch mode sees every operator's outputs, the
backward's included) and as they die (a finalizer on each storage). What is counted: bytes of tensor
storages allocated inside the block and alive at the same time, at their largest; tensors that existed before it
(the weights) are not. The counting costs time: measure speed without it.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.alive: dict[int, int] = {}  # id of a storage's Python object -> its bytes
        self.current = self.peak = self.total = 0

    def _free(self, key: int):
        self.current -= self.alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output that shares an input's storage (a view, detach, an in-place result) allocated nothing; this
        # also keeps views of tensors made before the block (the weights) out of the count
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" \
                    and id(tensor.untyped_storage()) not in inputs:
                # a storage keeps one Python object for its whole life (PyTorch preserves it), so a finalizer on
                # it runs when the memory is released, whoever held the last view
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self.alive:
                    self.alive[key] = storage.nbytes()
                    self.current += self.alive[key]
                    self.total += self.alive[key]
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """with PeakMemory(device) as m: ...  then m.peak_bytes: the most bytes of tensors allocated in the block and
    alive at once (CUDA: torch.cuda.max_memory_allocated above the memory allocated at entry), and m.total_bytes:
    all bytes allocated in the block (the memory traffic of allocations; linear work allocates linearly)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = self.total_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._allocated = torch.cuda.memory_stats(self.device).get("allocated_bytes.all.allocated", 0)
        else:
            self._counter = _StorageCounter().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            stats = torch.cuda.memory_stats(self.device)
            self.total_bytes = stats.get("allocated_bytes.all.allocated", 0) - self._allocated
        else:
            self._counter.__exit__(*exc)
            self.peak_bytes, self.total_bytes = self._counter.peak, self._counter.total
        return False
