"""A CPU stand-in for NCCL's rule that every tensor given to a collective lives on the GPU.

On a GPU node the default device is the CPU, so a tensor made without naming a device (for
example ``torch.tensor([loss])``) is a host tensor, and NCCL refuses it at the first collective
("No backend type associated with device type cpu"). On a CPU-only machine the training device
*is* the CPU and gloo accepts anything, so the mistake stays invisible. :func:`device_guard`
brings it back:

- a torch function mode tags every tensor a factory (``torch.tensor``, ``torch.zeros``, ...)
  makes without an explicit ``device``, and everything computed on the host from them (by
  PyTorch's rule: GPU ops accept 0-dim CPU scalars, nothing larger); an explicit move (``.to(device)``,
  ``.cuda()``) yields an untagged tensor — exactly the tensors that would be on the host on a GPU;
- the tensor collectives of ``torch.distributed`` (which DeepSpeed calls too) refuse a tagged
  tensor, or one not on the training device, with NCCL's message.

Blind spots, by construction of a CPU simulation: a tensor sent to the host on purpose
(``.cpu()``, ``.to("cpu")``) is indistinguishable from a move to the (CPU) training device, and
``torch.from_numpy`` is invisible to torch function modes. Install the guard before DeepSpeed
builds its communication backend (it keeps references to the collectives it will call).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["device_guard", "HostTensorInCollective"]

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.rand, torch.randn, torch.randint, torch.scalar_tensor, torch.eye}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter")


class HostTensorInCollective(RuntimeError):
    pass


class _HostTensors(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        # id -> weak reference (a WeakSet would compare tensors with ==, which is elementwise)
        self._tagged: dict[int, weakref.ref] = {}

    def tagged(self, t: torch.Tensor) -> bool:
        ref = self._tagged.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, t: torch.Tensor) -> None:
        self._tagged[id(t)] = weakref.ref(t)

    def _untag(self, t: torch.Tensor) -> None:
        if self.tagged(t):
            del self._tagged[id(t)]

    def _computes_on_host(self, inputs: list[Any]) -> bool:
        """PyTorch's rule: an op runs on the host when its tensors are all host tensors, or when a host
        tensor that is not a 0-dim scalar takes part (GPU ops accept CPU scalars, nothing larger)."""
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if self.tagged(t)]
        return bool(host) and (len(host) == len(tensors) or any(t.dim() > 0 for t in host))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            tag = kwargs.get("device") is None
        elif func in _MOVES:
            moved = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and not self.tagged(a))
                for a in args[1:])
            tag = not moved and self.tagged(args[0])
            if moved and isinstance(out, torch.Tensor):
                self._untag(out)  # on the CPU .to("cpu") may return the same object
        else:
            tag = self._computes_on_host(tree_flatten((args, kwargs))[0])
        if tag:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._tag(t)
        return out


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[list[str]]:
    """Run the body with host-tensor tagging and guarded collectives; yields the checked call names."""
    mode = _HostTensors()
    checked: list[str] = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def guarded(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and (mode.tagged(t) or t.device != device):
                    where = "host memory (made without a device)" if mode.tagged(t) else str(t.device)
                    raise HostTensorInCollective(
                        f"torch.distributed.{name} got a tensor in {where}, not on the training device {device}: "
                        "NCCL would fail with 'No backend type associated with device type cpu'")
            checked.append(name)
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, guarded(name, fn))
    try:
        with mode:
            yield checked
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
