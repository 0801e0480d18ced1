"""Tests for CKKS key files: modes, kinds, corruption, secret key never on the server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedcrypt.exceptions import KeyMaterialError
from fedcrypt.protection import wire
from fedcrypt.protection.he import keys


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "k"
    keys.write_key_files(out, preset="fast")
    return out


def test_files_and_modes(key_dir: Path) -> None:
    hospital = key_dir / keys.HOSPITAL_FILE
    server = key_dir / keys.SERVER_FILE
    assert stat.S_IMODE(hospital.stat().st_mode) == 0o600
    for path in (hospital, server):
        data = path.read_bytes()
        assert data.startswith(wire.MAGIC)  # a wire envelope, not a pickle


def test_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        h, _ = keys.write_key_files(tmp_path / "k", preset="fast")
    finally:
        os.umask(old)
    assert stat.S_IMODE(h.stat().st_mode) == 0o600


def test_round_trip_through_files(key_dir: Path) -> None:
    hospital = keys.load_hospital(key_dir / keys.HOSPITAL_FILE)
    server = keys.load_server(key_dir / keys.SERVER_FILE)
    assert hospital.fingerprint == server.fingerprint
    agg = server.aggregate([hospital.protect(np.full(5, 2.0), num_examples=4)])
    np.testing.assert_allclose(hospital.unprotect(agg).mean, 2.0, atol=1e-5)


def test_info(key_dir: Path) -> None:
    h = keys.read_info(key_dir / keys.HOSPITAL_FILE)
    s = keys.read_info(key_dir / keys.SERVER_FILE)
    assert (h.kind, h.has_secret_key) == ("hospital-secret", True)
    assert (s.kind, s.has_secret_key) == ("server-public", False)
    assert h.fingerprint == s.fingerprint
    assert h.preset.name == "fast"


def test_server_refuses_hospital_key(key_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="secret"):
        keys.load_server(key_dir / keys.HOSPITAL_FILE)


def test_hospital_refuses_server_key(key_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="server"):
        keys.load_hospital(key_dir / keys.SERVER_FILE)


def test_server_refuses_relabelled_hospital_key(key_dir: Path) -> None:
    """Even a hospital file whose header claims 'server-public' is never used."""
    env = wire.unpack((key_dir / keys.HOSPITAL_FILE).read_bytes())
    forged = wire.pack(dict(env.header, kind="server-public"), list(env.sections))
    with pytest.raises(KeyMaterialError):
        keys.server_from_bytes(forged)
    # ... nor with a consistent public section
    forged2 = wire.pack(dict(env.header, kind="server-public"), [env.sections[0], env.sections[0]])
    with pytest.raises(KeyMaterialError):
        keys.server_from_bytes(forged2)


def test_wide_permissions_refused(tmp_path: Path) -> None:
    h, _ = keys.write_key_files(tmp_path / "k", preset="fast")
    h.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="0644"):
        keys.load_hospital(h)


def test_missing_and_corrupt(tmp_path: Path, key_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="not found"):
        keys.load_server(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"garbage")
    with pytest.raises(KeyMaterialError):
        keys.load_server(bad)
    data = (key_dir / keys.SERVER_FILE).read_bytes()
    with pytest.raises(KeyMaterialError):
        keys.server_from_bytes(data[:-10])
    env = wire.unpack(data)
    with pytest.raises(KeyMaterialError, match="fingerprint"):
        keys.server_from_bytes(wire.pack(dict(env.header, fingerprint="00" * 32), env.sections))
    p = dict(env.header["preset"], scale_bits=30)
    with pytest.raises(KeyMaterialError, match="fingerprint"):
        keys.server_from_bytes(wire.pack(dict(env.header, preset=p), env.sections))
    with pytest.raises(KeyMaterialError):
        keys.hospital_from_bytes(wire.pack(dict(env.header, kind="other"), env.sections))


def test_refuses_overwrite_unless_forced(key_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="force"):
        keys.write_key_files(key_dir, preset="fast")


def test_force_overwrites_with_new_context(tmp_path: Path) -> None:
    out = tmp_path / "k"
    keys.write_key_files(out, preset="fast")
    first = keys.read_info(out / keys.SERVER_FILE).fingerprint
    (out / keys.HOSPITAL_FILE).chmod(0o644)
    keys.write_key_files(out, preset="fast", overwrite=True)
    assert keys.read_info(out / keys.SERVER_FILE).fingerprint != first
    assert stat.S_IMODE((out / keys.HOSPITAL_FILE).stat().st_mode) == 0o600


def test_generate_keys_distinct_fingerprints() -> None:
    h1, s1 = keys.generate_keys("fast")
    _h2, s2 = keys.generate_keys("fast")
    assert keys.server_from_bytes(s1).fingerprint != keys.server_from_bytes(s2).fingerprint
    assert keys.hospital_from_bytes(h1).fingerprint == keys.server_from_bytes(s1).fingerprint


def test_packed_key_files(tmp_path: Path) -> None:
    """The default (BFV) preset: same file rules; the server file holds parameters only."""
    h_path, s_path = keys.write_key_files(tmp_path / "k")
    assert stat.S_IMODE(h_path.stat().st_mode) == 0o600
    assert s_path.stat().st_size < 2000  # parameters only: no key material
    info = keys.read_info(h_path)
    assert info.preset.is_packed and info.has_secret_key
    assert not keys.read_info(s_path).has_secret_key
    hospital = keys.load_hospital(h_path)
    server = keys.load_server(s_path)
    agg = server.aggregate([hospital.protect(np.full(9, 0.25), num_examples=3)])
    np.testing.assert_allclose(hospital.unprotect(agg).mean, 0.25, atol=1e-3)
    with pytest.raises(KeyMaterialError, match="secret"):
        keys.load_server(h_path)
    with pytest.raises(KeyMaterialError):
        keys.load_hospital(s_path)
    env = wire.unpack(h_path.read_bytes())
    bad = wire.pack(env.header, [b"not a key", env.sections[1]])
    with pytest.raises(KeyMaterialError):
        keys.hospital_from_bytes(bad)


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_contexts_load_once_per_process(preset: str) -> None:
    """A key file's context is deserialized once; each call gets its own hospital state."""
    from fedcrypt.protection.he import keys as he_keys

    hospital_bytes, server_bytes = he_keys.generate_keys(preset)
    a = he_keys.hospital_from_bytes(hospital_bytes)
    b = he_keys.hospital_from_bytes(hospital_bytes)
    assert a._ctx is b._ctx and a is not b
    a.set_round("run", 3)
    assert b.round_state.round == 0
    s1, s2 = he_keys.server_from_bytes(server_bytes), he_keys.server_from_bytes(server_bytes)
    assert s1._ctx is s2._ctx
