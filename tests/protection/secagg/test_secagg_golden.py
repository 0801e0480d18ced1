"""Golden files of secagg: key files, the state file and derivations must keep working.

The files in ``tests/golden/secagg`` were written once by
``tests/golden/secagg/make_secagg_golden.py``. Sites keep their key files for a whole study and
their state files across upgrades; hospitals running different versions must agree on
what they sign and how they derive the group mask. Every later version must load these
files and reproduce the known answers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from _secagg_helpers import make_inputs, plain_fedavg

from fedcrypt.exceptions import KeyMaterialError
from fedcrypt.protection.secagg import RoundConfig, SecAggParams, SecAggServer, run_round
from fedcrypt.protection.secagg import keys as sk
from fedcrypt.protection.secagg.masking import group_mask_key
from fedcrypt.protection.secagg.messages import consistency_message
from fedcrypt.protection.secagg.state import Progress, load_progress

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "secagg"
sys.path.insert(0, str(GOLDEN))
import make_secagg_golden as mg  # noqa: E402

INFO = json.loads((GOLDEN / "golden.json").read_text())


def test_registry_still_loads_with_the_same_fingerprint_and_keys() -> None:
    reg = sk.registry_from_bytes((GOLDEN / "registry.bin").read_bytes())
    assert reg.fingerprint == INFO["fingerprint"] and reg.consortium == INFO["consortium"]
    assert reg.group_mask is True
    assert {str(h): k.public_bytes_raw().hex() for h, k in reg.keys.items()} == INFO["public_keys"]


@pytest.mark.parametrize("hid", [0, 1, 2])
def test_identity_files_still_load_and_match_the_registry(hid: int) -> None:
    ident = sk.identity_from_bytes((GOLDEN / f"hospital-{hid}.bin").read_bytes())
    assert ident.hospital_id == hid and ident.registry == INFO["fingerprint"]
    pub = ident.signing_key.public_key().public_bytes_raw().hex()
    assert pub == INFO["public_keys"][str(hid)]


def test_group_mask_file_still_loads() -> None:
    gm = sk.group_mask_from_bytes((GOLDEN / "group-mask.bin").read_bytes())
    assert gm.registry == INFO["fingerprint"] and sk.key_check(gm.key) == INFO["group_mask_check"]


def test_a_round_runs_from_the_golden_files(tmp_path: Path) -> None:
    """Through files on disk with the 0600 rule, as a site would."""
    for name in ("registry", "group-mask", "hospital-0", "hospital-1", "hospital-2"):
        shutil.copyfile(GOLDEN / f"{name}.bin", tmp_path / f"{name}.bin")
    (tmp_path / "hospital-0.bin").chmod(0o644)
    with pytest.raises(KeyMaterialError, match="0600"):
        sk.load_identity(tmp_path / "hospital-0.bin")
    params = SecAggParams(max_hospitals=3)
    hospitals = {}
    for hid in (0, 1, 2):
        (tmp_path / f"hospital-{hid}.bin").chmod(0o600)
        (tmp_path / "group-mask.bin").chmod(0o600)
        hospitals[hid] = sk.open_hospital(
            identity=tmp_path / f"hospital-{hid}.bin",
            registry=tmp_path / "registry.bin",
            group_mask=tmp_path / "group-mask.bin",
            params=params,
        )
    cfg = RoundConfig(round=1, hospital_ids=(0, 1, 2), vector_size=40, params=params)
    server = SecAggServer(cfg, registry=sk.load_registry(tmp_path / "registry.bin").keys)
    inputs = make_inputs((0, 1, 2), 40)
    report = run_round(server, hospitals, inputs)
    mean, total = plain_fedavg(inputs, (0, 1, 2))
    assert report.result is not None
    assert np.abs(report.result.mean - mean).max() <= params.error_bound(3, total)


def test_state_file_still_loads(tmp_path: Path) -> None:
    want = Progress(**INFO["state"])
    assert Progress.from_bytes((GOLDEN / "state.bin").read_bytes(), hospital_id=1) == want
    shutil.copyfile(GOLDEN / "state.bin", tmp_path / "h1.state")
    assert load_progress(tmp_path / "h1.state", hospital_id=1) == want
    assert want.to_bytes() == (GOLDEN / "state.bin").read_bytes()  # byte-identical writer


def test_known_answers_of_what_hospitals_sign_and_derive() -> None:
    msg = consistency_message(mg.KAT_SESSION, mg.KAT_ROUND, (7, 0, 2))
    assert msg.hex() == INFO["kat"]["consistency_message"]
    key = group_mask_key(
        mg.KAT_KEY,
        nonce=mg.KAT_NONCE,
        invited=mg.KAT_INVITED,
        round_=mg.KAT_ROUND,
        owner=2,
        size=10,
    )
    assert key.hex() == INFO["kat"]["group_mask_key"]
