"""Write the golden files of the current message formats (run from the project root).

    python tests/golden/make_golden.py           # format-2 messages, with the existing keys
    python tests/golden/make_golden.py --keys    # only for a new key-file format: new keys

The files pin formats other parties depend on: key files written by
``fedcrypt keys generate`` (hospitals keep them for years: they are never regenerated
for a message-format change), the ``FCRY`` wire envelope, and protected messages of each
scheme. The files without a ``-v2`` suffix were written by the code of 2026-12-01
(message format 1); the ``-v2`` files by the format-2 code (seeded ciphertexts, integrity
slots, round binding; plain in float32). They hold *test* key material only (never used
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
#: The run and round the format-2 golden messages are bound to.
RUN_ID = "golden-run"
ROUND = 3


def golden_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The two hospitals' (unweighted) updates, shape ``(SIZE,)``, float64."""
    rng = np.random.default_rng(SEED)
    return rng.normal(0, 0.1, SIZE), rng.normal(0, 0.1, SIZE)


def write_keys() -> dict[str, dict[str, str]]:
    """New golden key files (only when the key-file format itself changes)."""
    from fedcrypt.protection.he import keys

    info = {}
    for preset in ("packed", "fast"):
        hospital_bytes, server_bytes = keys.generate_keys(preset)
        (HERE / f"{preset}-hospital-key.bin").write_bytes(hospital_bytes)
        (HERE / f"{preset}-server-key.bin").write_bytes(server_bytes)
        info[preset] = {"fingerprint": keys.hospital_from_bytes(hospital_bytes).fingerprint}
    return info


def main() -> None:
    from fedcrypt.protection import wire
    from fedcrypt.protection.he import keys
    from fedcrypt.protection.plain import PlainAggregator, PlainHospital

    a, b = golden_vectors()
    meta = json.loads((HERE / "golden.json").read_text())
    if "--keys" in sys.argv:
        meta["keys"] = write_keys()
    envelope = wire.pack({"scheme": "test", "n": 1, "s": "é"}, [b"", b"abc", bytes(range(256))])
    assert envelope == (HERE / "envelope.bin").read_bytes(), "the envelope format changed"
    plain = PlainHospital()
    plain.set_round(RUN_ID, ROUND)
    plain_msgs = [plain.protect(v, num_examples=n) for v, n in zip((a, b), EXAMPLES, strict=True)]
    (HERE / "plain-update-v2.bin").write_bytes(plain_msgs[0])
    (HERE / "plain-aggregate-v2.bin").write_bytes(PlainAggregator().aggregate(plain_msgs))
    for preset in ("packed", "fast"):
        hospital = keys.hospital_from_bytes((HERE / f"{preset}-hospital-key.bin").read_bytes())
        server = keys.server_from_bytes((HERE / f"{preset}-server-key.bin").read_bytes())
        msgs = []
        for i, (v, n) in enumerate(zip((a, b), EXAMPLES, strict=True)):
            hospital.set_round(RUN_ID, ROUND, hospital=f"h{i}", seed=SEED)
            msgs.append(hospital.protect(v, num_examples=n))
        (HERE / f"{preset}-update-v2.bin").write_bytes(msgs[0])
        (HERE / f"{preset}-aggregate-v2.bin").write_bytes(server.aggregate(msgs))
    meta.update({"run": RUN_ID, "round": ROUND})
    (HERE / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote golden files to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
