"""Regenerate the secagg golden files (run once per format change, from the project root).

    python tests/golden/secagg/make_secagg_golden.py

The files pin formats other parties depend on: the consortium key files written by
``fedcrypt keys generate --protection secagg`` (sites keep them for a whole study), a
hospital's state file (kept across restarts and upgrades), and known-answer values of
the derivations every hospital must agree on across versions (the consistency message
each hospital signs, the session-bound group-mask key). They hold *test* key material
only (never used for real data); they are named ``*.bin`` so no tool mistakes them for
real keys.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOSPITALS = 3
#: Inputs of the known-answer values (fixed; not secret).
KAT_KEY = bytes(range(32))
KAT_NONCE = "0123456789abcdef" * 2
KAT_SESSION = "fe" * 32
KAT_INVITED = (0, 1, 2, 7)
KAT_ROUND = 3


def main() -> None:
    from fedcrypt.protection.secagg import keys
    from fedcrypt.protection.secagg.masking import group_mask_key
    from fedcrypt.protection.secagg.messages import consistency_message
    from fedcrypt.protection.secagg.state import Progress

    made = keys.generate_consortium(HOSPITALS, group_mask=True)
    (HERE / "registry.bin").write_bytes(made.registry)
    assert made.group_mask is not None
    (HERE / "group-mask.bin").write_bytes(made.group_mask)
    for hid, blob in made.identities.items():
        (HERE / f"hospital-{hid}.bin").write_bytes(blob)
    registry = keys.registry_from_bytes(made.registry)
    state = Progress(
        hospital=1,
        last_round=4,
        session="ab" * 32,
        signed="cd" * 32,
        revealed=True,
        last_unprotected=3,
    )
    (HERE / "state.bin").write_bytes(state.to_bytes())
    info = {
        "hospitals": HOSPITALS,
        "consortium": registry.consortium,
        "fingerprint": registry.fingerprint,
        "public_keys": {
            str(h): k.public_bytes_raw().hex() for h, k in sorted(registry.keys.items())
        },
        "group_mask_check": keys.key_check(keys.group_mask_from_bytes(made.group_mask).key),
        "state": {
            "hospital": 1,
            "last_round": 4,
            "session": "ab" * 32,
            "signed": "cd" * 32,
            "revealed": True,
            "last_unprotected": 3,
        },
        "kat": {
            "consistency_message": consistency_message(KAT_SESSION, KAT_ROUND, (7, 0, 2)).hex(),
            "group_mask_key": group_mask_key(
                KAT_KEY, nonce=KAT_NONCE, invited=KAT_INVITED, round_=KAT_ROUND, owner=2, size=10
            ).hex(),
        },
    }
    (HERE / "golden.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote secagg golden files to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
