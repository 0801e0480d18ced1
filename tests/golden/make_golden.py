"""Regenerate the golden files (run once per format change, from the project root).

    python tests/golden/make_golden.py

The files pin formats other parties depend on: key files written by
``fedcrypt keys generate`` (hospitals keep them for years), the ``FCRY`` wire envelope,
and protected messages of each scheme. They hold *test* key material only (never used
for real data); they are named ``*.bin`` so no tool mistakes them for real keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: The update every golden message protects: shape (1000,), float64, seeded.
SIZE = 1000
SEED = 20261201
EXAMPLES = (7, 11)


def golden_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The two hospitals' (unweighted) updates, shape ``(SIZE,)``, float64."""
    rng = np.random.default_rng(SEED)
    return rng.normal(0, 0.1, SIZE), rng.normal(0, 0.1, SIZE)


def main() -> None:
    from fedcrypt.protection import wire
    from fedcrypt.protection.he import keys
    from fedcrypt.protection.plain import PlainAggregator, PlainHospital

    a, b = golden_vectors()
    envelope = wire.pack({"scheme": "test", "n": 1, "s": "é"}, [b"", b"abc", bytes(range(256))])
    (HERE / "envelope.bin").write_bytes(envelope)
    plain_msgs = [
        PlainHospital().protect(v, num_examples=n) for v, n in zip((a, b), EXAMPLES, strict=True)
    ]
    (HERE / "plain-update.bin").write_bytes(plain_msgs[0])
    (HERE / "plain-aggregate.bin").write_bytes(PlainAggregator().aggregate(plain_msgs))
    info = {}
    for preset in ("packed", "fast"):
        hospital_bytes, server_bytes = keys.generate_keys(preset)
        (HERE / f"{preset}-hospital-key.bin").write_bytes(hospital_bytes)
        (HERE / f"{preset}-server-key.bin").write_bytes(server_bytes)
        hospital = keys.hospital_from_bytes(hospital_bytes)
        server = keys.server_from_bytes(server_bytes)
        msgs = [hospital.protect(v, num_examples=n) for v, n in zip((a, b), EXAMPLES, strict=True)]
        (HERE / f"{preset}-update.bin").write_bytes(msgs[0])
        (HERE / f"{preset}-aggregate.bin").write_bytes(server.aggregate(msgs))
        info[preset] = {"fingerprint": hospital.fingerprint}
    (HERE / "golden.json").write_text(
        json.dumps({"size": SIZE, "seed": SEED, "examples": EXAMPLES, "keys": info}, indent=2)
        + "\n"
    )
    print(f"wrote golden files to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
