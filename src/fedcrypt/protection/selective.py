"""Layer selection: encrypt some tensors, send the rest as weighted plaintext.

The seed paper (Lessage et al.) encrypts only MobileNetV2's last layer (and in one
experiment four). ``--encrypt-layers`` chooses the tensors: ``all``, ``last`` (the last
parameterized module), ``last:N`` (the last ``N`` parameterized modules) or a regular
expression searched in tensor names. Unselected tensors travel in plaintext (float32, as
``plain`` sends them, visible to the server; the server sums ``n_i x_i`` in float64 and
sends the mean in float32); the message records the fraction encrypted. Messages written
before the header field ``clear`` carried weighted float64 sums; they are still read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcrypt.exceptions import AggregationError, ConfigError, DecryptionError, ProtocolError
from fedcrypt.protection import wire
from fedcrypt.protection.base import (
    AggregateResult,
    HospitalProtection,
    ServerAggregator,
    check_update,
)
from fedcrypt.protection.flatten import Layout

_LAST = re.compile(r"^last(?::(\d+))?$")
#: ``clear`` header value: the plaintext part is float32 values (an upload: the hospital's
#: values; an aggregate: the FedAvg mean). Without the field: float64 weighted sums.
CLEAR_FLOAT32 = "float32"
_PARAM_LEAVES = ("weight", "bias")


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def parameterized_modules(layout: Layout) -> list[str]:
    """Module prefixes that own a ``weight`` or ``bias``, in ``state_dict`` order."""
    seen: list[str] = []
    for spec in layout.tensors:
        leaf = spec.name.rsplit(".", 1)[-1]
        mod = _module(spec.name)
        if leaf in _PARAM_LEAVES and mod not in seen:
            seen.append(mod)
    return seen


def select_layers(layout: Layout, spec: str) -> NDArray[np.bool_]:
    """Which values of the flat vector to encrypt.

    Parameters
    ----------
    layout : Layout
        The model's layout (``P = layout.size`` values).
    spec : str
        ``all``; ``last`` (every tensor of the last module owning a ``weight``/``bias``,
        e.g. the classifier ``Linear``); ``last:N`` (the last ``N`` such modules); or a
        regular expression, searched (``re.search``) in each tensor name.

    Returns
    -------
    numpy.ndarray
        bool, shape ``(P,)``: ``True`` where the value is encrypted.

    Raises
    ------
    ConfigError
        If ``spec`` is an invalid expression, ``N`` < 1 or larger than the number of
        parameterized modules, or selects nothing.
    """
    spec = spec.strip()
    mask = np.zeros(layout.size, dtype=bool)
    if spec == "all":
        mask[:] = True
        return mask
    m = _LAST.match(spec)
    if m is not None:
        modules = parameterized_modules(layout)
        count = int(m.group(1)) if m.group(1) else 1
        if not 1 <= count <= len(modules):
            raise ConfigError(
                f"--encrypt-layers {spec}: the model has {len(modules)} parameterized "
                f"layers, choose 1 to {len(modules)}"
            )
        chosen = set(modules[-count:])
        selected = [t for t in layout.tensors if _module(t.name) in chosen]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ConfigError(
                f"--encrypt-layers {spec!r} is not a valid expression: {exc}"
            ) from exc
        selected = [t for t in layout.tensors if pattern.search(t.name)]
    for t in selected:
        mask[t.offset : t.offset + t.numel] = True
    if not mask.any():
        raise ConfigError(
            f"--encrypt-layers {spec!r} selects no tensor (tensors: "
            f"{', '.join(layout.names()[:5])}{', ...' if len(layout.tensors) > 5 else ''})"
        )
    return mask


def selected_layout(layout: Layout, mask: NDArray[np.bool_]) -> Layout:
    """The layout of ``vector[mask]``: the tensors ``mask`` selects, packed from 0.

    Raises
    ------
    ConfigError
        If ``mask`` selects part of a tensor (:func:`select_layers` never does).
    """
    names = []
    for t in layout.tensors:
        part = mask[t.offset : t.offset + t.numel]
        if part.all():
            names.append(t.name)
        elif part.any():
            raise ConfigError(f"the layer selection covers only part of tensor {t.name!r}")
    return layout.select(names)


def mask_digest(mask: NDArray[np.bool_]) -> str:
    """sha256 of the packed mask (both sides must use the same selection)."""
    return hashlib.sha256(np.packbits(mask).tobytes() + str(mask.size).encode()).hexdigest()


def _parse(
    blob: bytes, scheme: tuple[str, ...]
) -> tuple[dict[str, Any], bytes, NDArray[np.float64]]:
    env = wire.unpack(blob, expect_scheme=scheme)
    h = env.header
    if h.get("selective") is not True or len(env.sections) != 2:
        raise ProtocolError("malformed selective message")
    size = wire.header_int(h, "size", minimum=1)
    enc = wire.header_int(h, "encrypted", minimum=1)
    wire.header_int(h, "num_examples", minimum=1)
    wire.header_int(h, "num_updates", minimum=1)
    clear = h.get("clear")
    if clear not in (None, CLEAR_FLOAT32):
        raise ProtocolError(f"malformed selective message: unknown plaintext format {clear!r}")
    width = 4 if clear == CLEAR_FLOAT32 else 8
    if enc > size or len(env.sections[1]) != width * (size - enc):
        raise ProtocolError("malformed selective message: plaintext part has the wrong size")
    if not isinstance(h.get("mask"), str):
        raise ProtocolError("malformed selective message: no mask digest")
    if clear == CLEAR_FLOAT32:
        values = np.frombuffer(env.sections[1], dtype=">f4").astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ProtocolError("malformed selective message: non-finite plaintext values")
        plain = values * float(h["num_examples"])  # the weighted sum, as before
    else:
        plain = np.frombuffer(env.sections[1], dtype=">f8").astype(np.float64)
    return h, bytes(env.sections[0]), plain


def _write(
    *,
    scheme: str,
    mask: str,
    size: int,
    encrypted: int,
    num_examples: int,
    num_updates: int,
    inner: bytes,
    plain: NDArray[np.float64],
) -> bytes:
    """``plain`` is the weighted sum ``Σ n_i x_i`` (float64); it is sent as the float32
    values ``plain / num_examples``."""
    header = {
        "scheme": scheme,
        "selective": True,
        "mask": mask,
        "size": int(size),
        "encrypted": int(encrypted),
        "fraction_encrypted": encrypted / size,
        "num_examples": int(num_examples),
        "num_updates": int(num_updates),
        "clear": CLEAR_FLOAT32,
    }
    values = np.asarray(plain, dtype=np.float64) / float(num_examples)
    return wire.pack(header, [inner, values.astype(">f4").tobytes()])


class SelectiveHospital:
    """Encrypt the values selected by ``mask`` with ``inner``; the rest in plaintext.

    Parameters
    ----------
    inner : HospitalProtection
        The encrypting scheme (e.g. :class:`~fedcrypt.protection.he.ckks.CKKSHospital`).
    mask : numpy.ndarray
        bool, shape ``(P,)``, from :func:`select_layers`; at least one ``True``.

    Raises
    ------
    ConfigError
        If ``mask`` selects nothing.
    """

    def __init__(self, inner: HospitalProtection, mask: NDArray[np.bool_]) -> None:
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 1 or not m.any():
            raise ConfigError("the encryption mask must be 1-D and select at least one value")
        self.scheme = inner.scheme
        self.wire_scheme: str = getattr(inner, "wire_scheme", inner.scheme)
        self.read_schemes: tuple[str, ...] = getattr(inner, "read_schemes", (self.wire_scheme,))
        self._inner = inner
        self._mask = m
        self._digest = mask_digest(m)

    @property
    def fraction_encrypted(self) -> float:
        """Fraction of the ``P`` values that are encrypted."""
        return float(self._mask.mean())

    @property
    def inner(self) -> HospitalProtection:
        """The encrypting scheme."""
        return self._inner

    @property
    def last_clipped(self) -> int:
        """Values the inner scheme clipped in the last :meth:`protect` (0 if it never clips)."""
        return int(getattr(self._inner, "last_clipped", 0))

    def set_round(
        self, run_id: str, round: int, *, hospital: str | None = None, seed: int | None = None
    ) -> None:
        """Forward the round binding to ``inner`` (see ``BFVHospital.set_round``)."""
        setter = getattr(self._inner, "set_round", None)
        if setter is not None:
            setter(run_id, round, hospital=hospital, seed=seed)

    @property
    def reference_examples(self) -> int | None:
        """The inner scheme's calibration count (see ``BFVHospital.reference_examples``)."""
        value = getattr(self._inner, "reference_examples", None)
        return value if isinstance(value, int) else None

    def set_reference(self, mean: NDArray[np.floating] | None, *, total_examples: int) -> None:
        """Forward a global model (shape ``(P,)``) to ``inner`` for its calibration."""
        setter = getattr(self._inner, "set_reference", None)
        if setter is not None:
            setter(
                None if mean is None else np.asarray(mean)[self._mask],
                total_examples=total_examples,
            )

    def protect(self, update: NDArray[np.floating], *, num_examples: int) -> bytes:
        """Encrypt the selected values, send the rest as float32 (with ``num_examples``).

        Raises
        ------
        ValueError
            If ``update`` is invalid or does not have the mask's size.
        """
        vec = check_update(update, num_examples)
        if vec.shape != self._mask.shape:
            raise ValueError(f"update has {vec.size} values, the layer mask {self._mask.size}")
        inner = self._inner.protect(vec[self._mask], num_examples=num_examples)
        plain = vec[~self._mask] * float(num_examples)
        return _write(
            scheme=self.wire_scheme,
            mask=self._digest,
            size=vec.size,
            encrypted=int(self._mask.sum()),
            num_examples=num_examples,
            num_updates=1,
            inner=inner,
            plain=plain,
        )

    def unprotect(self, aggregate: bytes, *, round: int | None = None) -> AggregateResult:
        """Decrypt the encrypted part, divide the plaintext part, reassemble ``(P,)``.

        ``round`` is passed on to ``inner`` (demand an aggregate of that round).

        Raises
        ------
        ProtocolError
            If the aggregate is malformed or used another layer selection.
        DecryptionError
            If the encrypted part does not decrypt.
        """
        h, inner_blob, plain = _parse(aggregate, self.read_schemes)
        if h["mask"] != self._digest or h["size"] != self._mask.size:
            raise ProtocolError("aggregate used another layer selection than this hospital")
        inner = (
            self._inner.unprotect(inner_blob)
            if round is None
            else self._inner.unprotect(inner_blob, round=round)  # type: ignore[call-arg]
        )
        n = int(h["num_examples"])
        if inner.total_examples != n or inner.mean.size != int(self._mask.sum()):
            raise DecryptionError("encrypted and plaintext parts of the aggregate disagree")
        mean = np.empty(self._mask.size, dtype=np.float64)
        mean[self._mask] = inner.mean
        mean[~self._mask] = plain / n
        return AggregateResult(mean=mean, total_examples=n, num_updates=inner.num_updates)


class SelectiveAggregator:
    """Server side of :class:`SelectiveHospital`: adds both parts.

    Parameters
    ----------
    inner : ServerAggregator
        The encrypting scheme's server side.
    mask_size : int, optional
        If given, updates must have this many values.
    """

    def __init__(self, inner: ServerAggregator, mask_size: int | None = None) -> None:
        self.scheme = inner.scheme
        self.wire_scheme: str = getattr(inner, "wire_scheme", inner.scheme)
        self.read_schemes: tuple[str, ...] = getattr(inner, "read_schemes", (self.wire_scheme,))
        self._inner = inner
        self._size = mask_size

    def aggregate(self, updates: Sequence[bytes]) -> bytes:
        """Add the encrypted parts with ``inner`` and the plaintext parts (``Σ n_i x_i`` in
        float64; the aggregate carries their mean in float32).

        Raises
        ------
        AggregationError
            If ``updates`` is empty or the updates used different selections or sizes.
        ProtocolError
            If an update is malformed.
        """
        if not updates:
            raise AggregationError("no updates to aggregate")
        parsed = [_parse(blob, self.read_schemes) for blob in updates]
        h0 = parsed[0][0]
        for h, _, _ in parsed:
            if h["mask"] != h0["mask"] or h["size"] != h0["size"]:
                raise AggregationError("updates used different layer selections or sizes")
        if self._size is not None and h0["size"] != self._size:
            raise AggregationError(f"updates have {h0['size']} values, expected {self._size}")
        inner = self._inner.aggregate([p[1] for p in parsed])
        plain = np.sum([p[2] for p in parsed], axis=0)
        return _write(
            scheme=self.wire_scheme,
            mask=str(h0["mask"]),
            size=int(h0["size"]),
            encrypted=int(h0["encrypted"]),
            num_examples=sum(int(h["num_examples"]) for h, _, _ in parsed),
            num_updates=sum(int(h["num_updates"]) for h, _, _ in parsed),
            inner=inner,
            plain=plain,
        )
