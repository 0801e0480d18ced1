"""One HE benchmark measurement, run in its own process so its peak memory can be read.

``python -m fedcrypt.bench.worker`` reads a JSON task on stdin and writes a JSON result
on stdout. Peak memory is the process's resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes C++ allocations that
``tracemalloc`` cannot see), reported in bytes, together with the high-water mark
reached before the measured phase (after imports, keys and the input data: "the model")
so that the difference is the memory the phase itself needed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The issue's measurement of the seed paper's code path: TenSEAL ``ckks_tensor`` (one
#: ciphertext per value), N=8192, [60,40,40,60], scale 2^40, public-key encryption.
PAPER_N = 8192
PAPER_BITS = (60, 40, 40, 60)
PAPER_SCALE_BITS = 40


def peak_rss() -> int:
    """The process's peak resident set size so far, bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def update_vector(values: int, *, seed: int = 0) -> np.ndarray:
    """A synthetic model update: float32 weights ~ N(0, 0.05), shape ``(values,)``."""
    return np.random.default_rng(seed).normal(0.0, 0.05, values).astype(np.float32)


def _protect_row(t0: float, t1: float, t2: float, *, size: int, baseline: int) -> dict[str, Any]:
    """One protect measurement: encrypt ``t0..t1``, serialize ``t1..t2`` (seconds), bytes."""
    return {
        "encrypt_s": t1 - t0,
        "serialize_s": t2 - t1,
        "protect_s": t2 - t0,
        "bytes": size,
        "peak_bytes": peak_rss(),
        "baseline_bytes": baseline,
    }


def _paper(task: dict[str, Any]) -> dict[str, Any]:
    """The seed paper's method: one CKKS ciphertext per value (``ts.ckks_tensor``)."""
    import tenseal as ts

    n = int(task.get("poly_modulus_degree", PAPER_N))
    bits = list(task.get("coeff_mod_bit_sizes", PAPER_BITS))
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=bits)
    ctx.global_scale = float(2 ** int(task.get("scale_bits", PAPER_SCALE_BITS)))
    x = update_vector(int(task["values"])).astype(np.float64)
    base = peak_rss()
    t0 = time.perf_counter()
    enc = ts.ckks_tensor(ctx, ts.plain_tensor(x.tolist(), [x.size]))
    t1 = time.perf_counter()
    blob = enc.serialize()
    t2 = time.perf_counter()
    out: dict[str, Any] = _protect_row(t0, t1, t2, size=len(blob), baseline=base)
    if task.get("full"):
        copies = [ts.ckks_tensor_from(ctx, blob) for _ in range(int(task.get("copies", 10)))]
        t3 = time.perf_counter()
        acc = copies[0]
        for c in copies[1:]:
            acc = acc + c
        acc.serialize()
        t4 = time.perf_counter()
        acc.decrypt()
        t5 = time.perf_counter()
        out.update({"aggregate_s": t4 - t3, "decrypt_s": t5 - t4})
    return out


def _tenseal_parts(task: dict[str, Any]) -> dict[str, Any]:
    """Packed CKKS vectors (NVIDIA FLARE's way): encrypt and serialize timed apart."""
    import tenseal as ts

    from fedcrypt.protection.he.ckks import context_for
    from fedcrypt.protection.he.params import get_preset

    preset = get_preset(str(task["preset"]))
    ctx = context_for(preset)
    x = update_vector(int(task["values"])).astype(np.float64)
    base = peak_rss()
    t0 = time.perf_counter()
    vecs = [ts.ckks_vector(ctx, x[i : i + preset.slots]) for i in range(0, x.size, preset.slots)]
    t1 = time.perf_counter()
    size = sum(len(v.serialize()) for v in vecs)
    t2 = time.perf_counter()
    return _protect_row(t0, t1, t2, size=size, baseline=base)


def _packed_parts(task: dict[str, Any]) -> dict[str, Any]:
    """Ours: quantize + pack + encrypt, then serialize, timed apart (calibrated round)."""
    from fedcrypt.protection.he import keys
    from fedcrypt.protection.he.bfv import BFVHospital

    codec = keys.hospital_from_bytes(keys.generate_keys(str(task["preset"]))[0])
    assert isinstance(codec, BFVHospital)
    x = update_vector(int(task["values"])).astype(np.float64)
    n = 100
    noise = np.random.default_rng(1).normal(0.0, 0.001, x.size)
    codec.set_reference(x + noise, total_examples=10 * n)
    base = peak_rss()
    t0 = time.perf_counter()
    enc = codec.encode(x * n, num_examples=n)
    cts = [codec.context.encrypt_ciphertext(row) for row in enc.slots]
    t1 = time.perf_counter()
    size = sum(len(codec.context.dump(c)) for c in cts) + len(enc.table)
    t2 = time.perf_counter()
    return _protect_row(t0, t1, t2, size=size, baseline=base)


def _hospital(preset: str, key_dir: Path) -> Any:
    from fedcrypt.protection.he import keys
    from fedcrypt.protection.plain import PlainHospital

    if preset == "plain":
        return PlainHospital()
    return keys.hospital_from_bytes((key_dir / "hospital.key").read_bytes())


def _protect(task: dict[str, Any]) -> dict[str, Any]:
    """A hospital's protect (quantize + encrypt + serialize), repeated, best time kept."""
    key_dir = Path(task["key_dir"])
    hospital = _hospital(str(task["preset"]), key_dir)
    values = int(task["values"])
    x = update_vector(values)
    n = int(task.get("num_examples", 100))
    if task.get("calibrated") and hasattr(hospital, "set_reference"):
        # the global model the round started from: the update is close to it
        noise = np.random.default_rng(1).normal(0.0, 0.001, values)
        hospital.set_reference(x + noise, total_examples=int(task.get("copies", 10)) * n)
    base = peak_rss()
    best = float("inf")
    blob = b""
    for _ in range(int(task.get("repeat", 1))):
        t0 = time.perf_counter()
        blob = hospital.protect(x, num_examples=n)
        best = min(best, time.perf_counter() - t0)
    Path(task["out"]).write_bytes(blob)
    return {
        "protect_s": best,
        "bytes": len(blob),
        "peak_bytes": peak_rss(),
        "baseline_bytes": base,
        "clipped": int(getattr(hospital, "last_clipped", 0)),
    }


def _aggregate(task: dict[str, Any]) -> dict[str, Any]:
    """The server adding ``copies`` received updates (distinct buffers, same content)."""
    from fedcrypt.protection.he import keys
    from fedcrypt.protection.plain import PlainAggregator

    preset = str(task["preset"])
    key_dir = Path(task["key_dir"])
    server: Any = (
        PlainAggregator()
        if preset == "plain"
        else keys.server_from_bytes((key_dir / "server.key").read_bytes())
    )
    blob = Path(task["in"]).read_bytes()
    base = peak_rss()
    received = [bytes(bytearray(blob)) for _ in range(int(task.get("copies", 10)))]
    elapsed = float("inf")
    agg = b""
    for _ in range(int(task.get("repeat", 1))):
        t0 = time.perf_counter()
        agg = server.aggregate(received)
        elapsed = min(elapsed, time.perf_counter() - t0)
    Path(task["out"]).write_bytes(agg)
    return {
        "aggregate_s": elapsed,
        "bytes": len(agg),
        "peak_bytes": peak_rss(),
        "baseline_bytes": base,
    }


def _decrypt(task: dict[str, Any]) -> dict[str, Any]:
    """A hospital decrypting (unprotecting) the aggregate."""
    hospital = _hospital(str(task["preset"]), Path(task["key_dir"]))
    blob = Path(task["in"]).read_bytes()
    base = peak_rss()
    best = float("inf")
    err = 0.0
    for _ in range(int(task.get("repeat", 1))):
        t0 = time.perf_counter()
        result = hospital.unprotect(blob)
        best = min(best, time.perf_counter() - t0)
        expected = update_vector(result.mean.size).astype(np.float64)
        err = float(np.max(np.abs(result.mean - expected)))
    return {"decrypt_s": best, "peak_bytes": peak_rss(), "baseline_bytes": base, "max_error": err}


def _keys(task: dict[str, Any]) -> dict[str, Any]:
    from fedcrypt.protection.he import keys

    t0 = time.perf_counter()
    h, s = keys.generate_keys(str(task["preset"]))
    elapsed = time.perf_counter() - t0
    key_dir = Path(task["key_dir"])
    key_dir.mkdir(parents=True, exist_ok=True)
    (key_dir / "hospital.key").write_bytes(h)
    (key_dir / "server.key").write_bytes(s)
    return {"keygen_s": elapsed, "hospital_key_bytes": len(h), "server_key_bytes": len(s)}


TASKS = {
    "paper": _paper,
    "tenseal-parts": _tenseal_parts,
    "packed-parts": _packed_parts,
    "keys": _keys,
    "protect": _protect,
    "aggregate": _aggregate,
    "decrypt": _decrypt,
}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in this process (see :data:`TASKS`)."""
    return TASKS[str(task["kind"])](task)


def main() -> None:
    """Read a task (JSON) on stdin, write its result (JSON) on stdout."""
    task = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(run_task(task)))


if __name__ == "__main__":
    main()
