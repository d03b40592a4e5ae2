"""tools/syncs.py -- count the host reads of device values (each one a device sync on CUDA).

    with SyncCounter(model, device) as c:
        ...                                  # e.g. a script's train_task
    c.count, c.sites                         # reads, and where they happen (file:line -> count)

A read is `.item()`, `.tolist()`, `bool()`, `int()`, `float()`, `.nonzero()`, `.unique()`, `.cpu()`
... of a tensor that lives on the device: on CUDA these wait for the GPU to finish everything
queued before them. On the CPU nothing waits, so the counter tracks which tensors WOULD live on
the device: the model's parameters and buffers, what `.to(device)` returns, what is created with
`device=device` (a torch.device; the literal string "cpu" means the host, as torch's optimisers
write it), and everything computed from those. Host tensors (a loader's labels before
`.to(device)`, Adam's step counters) are not counted, as on CUDA.

Used by the tests (tests/test_speed.py) and by tools/cpu_speed.py (syncs per training step).
"""
from __future__ import annotations

import collections
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

T = torch.Tensor
READS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
         T.argwhere, torch.argwhere, T.unique, torch.unique, T.unique_consecutive, torch.unique_consecutive,
         T.masked_select, torch.masked_select, T.cpu, T.numpy, T.bincount, torch.bincount}
MOVES = {T.to, T.cuda}
IN_PLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "copy_"}


class SyncCounter(TorchFunctionMode):
    def __init__(self, model: torch.nn.Module | None, device):
        super().__init__()
        self.device = torch.device(device)
        self.on_device = WeakIdKeyDictionary()
        self.count = 0
        self.sites: collections.Counter = collections.Counter()
        for t in list(model.parameters()) + list(model.buffers()) if model is not None else []:
            self.on_device[t] = True

    def mark(self, *tensors) -> None:
        """Treat these tensors as device tensors too (e.g. state built before counting)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True

    def _is_dev(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self.device.type != "cpu":
            return t.device.type == self.device.type
        return t in self.on_device

    def _targets_device(self, func, args, kwargs) -> bool:
        dev = kwargs.get("device")
        if func in MOVES:
            dev = dev or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if func is T.cuda:
                return True
        if dev is None or (self.device.type == "cpu" and dev == "cpu"):
            return False                                            # the literal "cpu": code that means the host
        try:
            return torch.device(dev).type == self.device.type
        except (RuntimeError, TypeError):
            return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and self._is_dev(args[0]) and (func in READS or (
                func is T.to and self.device.type != "cpu" and not kwargs.get("non_blocking")
                and any(torch.device(a).type == "cpu" for a in (*args[1:], kwargs.get("device"))
                        if isinstance(a, (str, torch.device))))):
            self.count += 1
            f = sys._getframe(1)
            self.sites[f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"] += 1
        out = func(*args, **kwargs)
        if self.device.type == "cpu":
            name = getattr(func, "__name__", "")
            inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if self._targets_device(func, args, kwargs):
                if args and out is args[0] and func in MOVES:       # on CUDA a move copies: so here
                    out = out.clone()
                self.mark(out)
            elif any(self._is_dev(a) for a in inputs):
                given = {id(a) for a in inputs}                     # outputs that are inputs keep their place
                self.mark([o for o in tree_leaves(out) if id(o) not in given])
                if args and isinstance(args[0], torch.Tensor) and (name in IN_PLACE or
                                                                   (name.endswith("_") and not name.startswith("_"))):
                    self.mark(args[0])                              # written in place from device values
        return out
