"""Consortium key files: who holds what, validation, refusals, and a round run from files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from _secagg_helpers import make_inputs, plain_fedavg

from fedcrypt.exceptions import ConfigError, KeyMaterialError
from fedcrypt.protection import wire
from fedcrypt.protection.secagg import RoundConfig, SecAggParams, SecAggServer, run_round
from fedcrypt.protection.secagg import keys as sk

P = 32


@pytest.fixture
def consortium(tmp_path: Path) -> sk.ConsortiumFiles:
    return sk.write_consortium(tmp_path / "keys", hospitals=3)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_consortium_writes_what_each_party_holds(consortium: sk.ConsortiumFiles) -> None:
    out = consortium.registry.parent
    assert sorted(p.name for p in out.iterdir()) == [
        "group-mask.key",
        "hospital-0.key",
        "hospital-1.key",
        "hospital-2.key",
        "registry.pub",
    ]
    assert mode(consortium.registry) == 0o644
    assert consortium.group_mask is not None and mode(consortium.group_mask) == 0o600
    assert all(mode(p) == 0o600 for p in consortium.identities.values())
    reg = sk.load_registry(consortium.registry)
    assert reg.hospital_ids == (0, 1, 2) and reg.group_mask
    assert reg.fingerprint == consortium.fingerprint
    for hid, path in consortium.identities.items():
        ident = sk.load_identity(path)
        assert ident.hospital_id == hid and ident.registry == reg.fingerprint
        pub = ident.signing_key.public_key().public_bytes_raw()
        assert pub == reg.keys[hid].public_bytes_raw()
    # the registry holds nothing secret: no section, only public keys in its header
    env = wire.unpack(consortium.registry.read_bytes())
    assert env.sections == [] and env.header["kind"] == "registry-public"
    gm = sk.load_group_mask(consortium.group_mask)
    raw_registry = consortium.registry.read_bytes()
    assert gm.key not in raw_registry and gm.key.hex().encode() not in raw_registry
    for path in consortium.identities.values():
        secret = sk.load_identity(path).signing_key.private_bytes_raw()
        assert secret not in raw_registry and secret.hex().encode() not in raw_registry


def test_a_round_runs_from_the_key_files(consortium: sk.ConsortiumFiles, tmp_path: Path) -> None:
    params = SecAggParams(max_hospitals=3)
    hospitals = {
        hid: sk.open_hospital(
            identity=path,
            registry=consortium.registry,
            group_mask=consortium.group_mask,
            params=params,
            state_file=tmp_path / f"h{hid}.state",
        )
        for hid, path in consortium.identities.items()
    }
    server_registry = sk.load_registry(consortium.registry).keys  # all the server gets
    cfg = RoundConfig(round=1, hospital_ids=(0, 1, 2), vector_size=P, params=params)
    inputs = make_inputs((0, 1, 2), P)
    report = run_round(SecAggServer(cfg, registry=server_registry), hospitals, inputs)
    mean, total = plain_fedavg(inputs, (0, 1, 2))
    assert report.result is not None and report.result.total_examples == total
    assert np.abs(report.result.mean - mean).max() <= params.error_bound(3, total)


@pytest.mark.parametrize("secret", ["identity", "group_mask"])
def test_the_server_refuses_a_secret_file_as_its_registry(
    consortium: sk.ConsortiumFiles, secret: str
) -> None:
    path = consortium.identities[0] if secret == "identity" else consortium.group_mask
    assert path is not None
    with pytest.raises(KeyMaterialError, match=r"refusing a secret .* registry\.pub"):
        sk.load_registry(path)


def test_loaders_refuse_the_wrong_kind(consortium: sk.ConsortiumFiles, tmp_path: Path) -> None:
    assert consortium.group_mask is not None
    with pytest.raises(KeyMaterialError, match="public registry"):
        sk.identity_from_bytes(consortium.registry.read_bytes())
    with pytest.raises(KeyMaterialError, match="group-mask key, not a hospital identity"):
        sk.load_identity(consortium.group_mask)
    with pytest.raises(KeyMaterialError, match="not the consortium's group-mask key"):
        sk.load_group_mask(consortium.identities[1])
    he = tmp_path / "he.bin"
    he.write_bytes(wire.pack({"scheme": "ckks", "kind": "server-public"}, []))
    with pytest.raises(KeyMaterialError, match="not a fedcrypt secagg key file"):
        sk.load_registry(he)
    with pytest.raises(KeyMaterialError, match="not a fedcrypt secagg key file"):
        sk.registry_from_bytes(b"garbage")
    with pytest.raises(KeyMaterialError, match="not found"):
        sk.load_registry(tmp_path / "missing.pub")


def test_secret_files_wider_than_0600_are_refused(consortium: sk.ConsortiumFiles) -> None:
    path = consortium.identities[2]
    path.chmod(0o640)
    with pytest.raises(KeyMaterialError, match="wider than 0600"):
        sk.load_identity(path)
    assert consortium.group_mask is not None
    consortium.group_mask.chmod(0o604)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        sk.load_group_mask(consortium.group_mask)


def edit_header(path: Path, **changes: object) -> bytes:
    env = wire.unpack(path.read_bytes())
    return wire.pack({**env.header, **changes}, [bytes(s) for s in env.sections])


def test_corrupted_files_are_refused(consortium: sk.ConsortiumFiles) -> None:
    reg = wire.unpack(consortium.registry.read_bytes()).header
    other_key = sk.load_registry(consortium.identities[0].parent / "registry.pub").keys[1]
    swapped = {**reg["hospitals"], "0": other_key.public_bytes_raw().hex()}
    with pytest.raises(KeyMaterialError, match="fingerprint"):
        sk.registry_from_bytes(edit_header(consortium.registry, hospitals=swapped))
    with pytest.raises(KeyMaterialError, match="format"):
        sk.registry_from_bytes(edit_header(consortium.registry, format=2))
    with pytest.raises(KeyMaterialError, match="invalid hospital id"):
        sk.registry_from_bytes(
            edit_header(consortium.registry, hospitals={**reg["hospitals"], "x": "00" * 32})
        )
    with pytest.raises(KeyMaterialError, match="1 hospitals"):
        sk.registry_from_bytes(edit_header(consortium.registry, hospitals={"0": "00" * 32}))
    with pytest.raises(KeyMaterialError, match="does not match its public key"):
        sk.identity_from_bytes(edit_header(consortium.identities[0], public_key="00" * 32))
    assert consortium.group_mask is not None
    with pytest.raises(KeyMaterialError, match="check value"):
        sk.group_mask_from_bytes(edit_header(consortium.group_mask, check="00" * 16))
    env = wire.unpack(consortium.group_mask.read_bytes())
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        sk.group_mask_from_bytes(wire.pack(env.header, [b"short"]))


def test_files_of_another_consortium_do_not_mix(
    consortium: sk.ConsortiumFiles, tmp_path: Path
) -> None:
    other = sk.write_consortium(tmp_path / "other", hospitals=3)
    params = SecAggParams()
    with pytest.raises(KeyMaterialError, match="not generated with this registry"):
        sk.open_hospital(
            identity=consortium.identities[0],
            registry=other.registry,  # e.g. a registry the server handed out
            group_mask=consortium.group_mask,
            params=params,
        )
    with pytest.raises(KeyMaterialError, match="another consortium"):
        sk.open_hospital(
            identity=consortium.identities[0],
            registry=consortium.registry,
            group_mask=other.group_mask,
            params=params,
        )
    with pytest.raises(ConfigError, match=r"group-mask\.key"):
        sk.open_hospital(
            identity=consortium.identities[0], registry=consortium.registry, params=params
        )
    with pytest.raises(ConfigError, match="group_mask=True"):
        sk.open_hospital(
            identity=consortium.identities[0],
            registry=consortium.registry,
            params=SecAggParams(group_mask=False),
        )


def test_without_group_mask_and_overwrite_rules(tmp_path: Path) -> None:
    files = sk.write_consortium(tmp_path, hospitals=2, group_mask=False)
    assert files.group_mask is None and not (tmp_path / "group-mask.key").exists()
    assert sk.load_registry(files.registry).group_mask is False
    with pytest.raises(KeyMaterialError, match="--force"):
        sk.write_consortium(tmp_path, hospitals=2, group_mask=False)
    before = files.registry.read_bytes()
    files.identities[0].chmod(0o644)
    again = sk.write_consortium(tmp_path, hospitals=2, group_mask=False, overwrite=True)
    assert again.registry.read_bytes() != before
    assert mode(again.identities[0]) == 0o600


@pytest.mark.parametrize("n", [1, 0, sk.MAX_HOSPITALS + 1])
def test_hospital_count_is_validated(n: int, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hospitals"):
        sk.write_consortium(tmp_path, hospitals=n)
    assert not tmp_path.joinpath("registry.pub").exists()


def test_repr_never_shows_a_secret(consortium: sk.ConsortiumFiles) -> None:
    ident = sk.load_identity(consortium.identities[0])
    assert consortium.group_mask is not None
    gm = sk.load_group_mask(consortium.group_mask)
    assert gm.key.hex() not in repr(gm) and "signing_key" not in repr(ident)
