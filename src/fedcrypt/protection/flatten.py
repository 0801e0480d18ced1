"""Flatten a model's ``state_dict`` into one vector and back.

Every protection scheme works on a flat float vector of ``P`` parameters; this module is
the only place that knows how tensors map onto it. The layout (names, shapes, dtypes, in
``state_dict`` order) is described by a :class:`Layout` that both sides derive from the
same model, so it never travels with the update.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray

#: What a tensor holds, as far as quantization cares (see :attr:`TensorSpec.kind`).
TensorKind = Literal["weight", "bias", "bn_mean", "bn_var", "integer", "float"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in the flat vector: ``vector[offset : offset + numel]``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int

    @property
    def kind(self) -> TensorKind:
        """What the tensor holds, from its dtype and its ``state_dict`` name.

        ``"integer"`` for any non-floating dtype (BatchNorm's ``num_batches_tracked``
        counter, masks); ``"bn_var"`` / ``"bn_mean"`` for the ``running_var`` /
        ``running_mean`` buffers of PyTorch's normalisation layers (a variance is never
        negative); ``"weight"`` / ``"bias"`` by the last name component; ``"float"`` for
        any other floating tensor.
        """
        if not self.dtype.is_floating_point:
            return "integer"
        leaf = self.name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            return "bn_var"
        if leaf == "running_mean":
            return "bn_mean"
        if leaf in ("weight", "bias"):
            return leaf  # type: ignore[return-value]
        return "float"


@dataclass(frozen=True)
class Layout:
    """The ordered tensors of a ``state_dict`` and their slices of the flat vector.

    Attributes
    ----------
    tensors : tuple of TensorSpec
        In ``state_dict`` order.
    size : int
        ``P``, the total number of values.
    """

    tensors: tuple[TensorSpec, ...]
    size: int

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> Layout:
        """Describe ``state_dict`` (every entry, buffers included)."""
        specs: list[TensorSpec] = []
        offset = 0
        for name, t in state_dict.items():
            n = int(t.numel())
            specs.append(TensorSpec(name, tuple(t.shape), t.dtype, offset, n))
            offset += n
        return cls(tuple(specs), offset)

    def names(self) -> list[str]:
        """Tensor names in order."""
        return [s.name for s in self.tensors]

    def select(self, names: Iterable[str]) -> Layout:
        """The layout of the named tensors alone, in this layout's order, packed from 0.

        It describes ``vector[mask]`` where ``mask`` selects exactly those tensors (as
        :func:`fedcrypt.protection.selective.select_layers` does).

        Raises
        ------
        ValueError
            If a name is not in this layout.
        """
        wanted = set(names)
        unknown = wanted - set(self.names())
        if unknown:
            raise ValueError(f"no tensor named {sorted(unknown)[0]!r} in the layout")
        specs: list[TensorSpec] = []
        offset = 0
        for t in self.tensors:
            if t.name in wanted:
                specs.append(TensorSpec(t.name, t.shape, t.dtype, offset, t.numel))
                offset += t.numel
        return Layout(tuple(specs), offset)


def flatten(state_dict: Mapping[str, torch.Tensor]) -> NDArray[np.float64]:
    """Concatenate every tensor of ``state_dict`` into one float64 vector of shape ``(P,)``.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are carried as floats and
    rounded back by :func:`unflatten`.
    """
    if not state_dict:
        raise ValueError("state_dict is empty")
    parts = [t.detach().cpu().reshape(-1).to(torch.float64).numpy() for t in state_dict.values()]
    return np.concatenate(parts)


def unflatten(vector: NDArray[np.floating], layout: Layout) -> OrderedDict[str, torch.Tensor]:
    """Rebuild a ``state_dict`` from a flat vector.

    Parameters
    ----------
    vector : numpy.ndarray
        Shape ``(layout.size,)``.
    layout : Layout
        The model's layout.

    Raises
    ------
    ValueError
        If ``vector`` does not have ``layout.size`` values.
    """
    vec = np.asarray(vector)
    if vec.shape != (layout.size,):
        raise ValueError(f"vector has shape {vec.shape}, the model needs ({layout.size},)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for s in layout.tensors:
        chunk = torch.from_numpy(np.array(vec[s.offset : s.offset + s.numel], dtype=np.float64))
        if s.dtype.is_floating_point:
            t = chunk.to(s.dtype)
        else:
            t = torch.round(chunk).to(s.dtype)
        out[s.name] = t.reshape(s.shape)
    return out
