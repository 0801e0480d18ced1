"""Unit tests: blob store, streaming message inspection, credentials, rate limiter, plots."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from portal_helpers import plain_update, sha

from fedcrypt.exceptions import ProtocolError
from fedcrypt.portal import security
from fedcrypt.portal.plots import MetricPoint, metrics_png, summarize
from fedcrypt.portal.storage import BlobStore, UploadTooLargeError
from fedcrypt.portal.validation import check_against_federation, inspect_file
from fedcrypt.protection import wire
from fedcrypt.protection.registry import HE, PLAIN


def test_blob_store_commit_dedupe_and_limit(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    pending = store.begin(limit=10)
    pending.write(b"hello")
    digest = store.commit(pending)
    assert digest == sha(b"hello") and store.read_bytes(digest) == b"hello"
    assert store.put_bytes(b"hello") == digest  # same content, one file
    assert list(store.tmp.iterdir()) == []
    big = store.begin(limit=4)
    with pytest.raises(UploadTooLargeError):
        big.write(b"12345")
    big.discard()
    assert list(store.tmp.iterdir()) == []
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.path("../../etc/passwd")
    (store.tmp / "left.part").write_bytes(b"x")
    assert store.clear_tmp() == 1
    store.delete(digest)
    store.delete(digest)
    assert not store.exists(digest)


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "u.bin"
    p.write_bytes(data)
    return p


def test_inspect_file_matches_wire_unpack(tmp_path: Path) -> None:
    blob = plain_update(np.arange(5.0), 7)
    info = inspect_file(_write(tmp_path, blob))
    env = wire.unpack(blob)
    assert info.header == env.header and info.section_lengths == (20,)  # 5 float32 values
    assert (info.num_examples, info.num_updates, info.size) == (7, 1, 5)
    check_against_federation(info, scheme=PLAIN, model_size=5, key_fingerprint=None)
    with pytest.raises(ProtocolError, match="wrong model size"):
        check_against_federation(info, scheme=PLAIN, model_size=6, key_fingerprint=None)
    with pytest.raises(ProtocolError, match="'plain'"):
        check_against_federation(info, scheme=HE, model_size=None, key_fingerprint="ab")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:5] + struct.pack(">I", 10**7) + b[9:], "truncated header"),
    ],
)
def test_inspect_file_rejects_malformed(tmp_path: Path, mutate: object, message: str) -> None:
    blob = plain_update(np.arange(5.0), 7)
    with pytest.raises(ProtocolError, match=message):
        inspect_file(_write(tmp_path, mutate(blob)))  # type: ignore[operator]


def test_inspect_file_header_fields(tmp_path: Path) -> None:
    no_examples = wire.pack({"scheme": "plain", "size": 1}, [b"\x00" * 8])
    with pytest.raises(ProtocolError, match="num_examples"):
        inspect_file(_write(tmp_path, no_examples))
    aggregate = wire.pack(
        {"scheme": "plain", "size": 1, "num_examples": 2, "num_updates": 2}, [b"\x00" * 8]
    )
    info = inspect_file(_write(tmp_path, aggregate))
    with pytest.raises(ProtocolError, match="aggregate of 2"):
        check_against_federation(info, scheme=PLAIN, model_size=1, key_fingerprint=None)
    ckks_like = wire.pack(
        {"scheme": "ckks", "size": 3, "num_examples": 1, "fingerprint": "aa" * 32}, [b"c"]
    )
    info = inspect_file(_write(tmp_path, ckks_like))
    with pytest.raises(ProtocolError, match="another key context"):
        check_against_federation(info, scheme=HE, model_size=3, key_fingerprint="bb" * 32)
    check_against_federation(info, scheme=HE, model_size=3, key_fingerprint="aa" * 32)


def test_bearer_secrets_and_csrf() -> None:
    cred = security.new_bearer_secret()
    assert security.split_bearer(cred.value) == (cred.key_id, cred.secret)
    assert security.secret_matches(cred.secret, cred.secret_hash)
    assert not security.secret_matches(cred.secret + "x", cred.secret_hash)
    assert cred.secret not in cred.secret_hash
    for bad in ("", "fcp_", "fcp_abc", "xyz_abc.def", "fcp_a-b.c", "fcp_a." + "x" * 300):
        assert security.split_bearer(bad) is None
    token = security.csrf_token("server-secret", "nonce")
    assert security.csrf_valid("server-secret", "nonce", token)
    assert not security.csrf_valid("other-secret", "nonce", token)
    assert not security.csrf_valid("server-secret", "other", token)
    assert not security.csrf_valid("server-secret", None, token)


def test_password_hashing() -> None:
    h = security.hash_password("correct horse battery")
    assert h.startswith("$argon2id$") and "correct" not in h
    assert security.verify_password(h, "correct horse battery")
    assert not security.verify_password(h, "wrong")
    assert not security.verify_password(None, "anything")
    assert not security.verify_password("not-a-hash", "anything")


def test_rate_limiter_window() -> None:
    now = [0.0]
    limiter = security.LoginRateLimiter(2, 10.0, clock=lambda: now[0])
    assert limiter.retry_after("ip:1") == 0
    limiter.failure("ip:1", "email:a")
    limiter.failure("ip:1", "email:b")
    assert limiter.retry_after("ip:1") == pytest.approx(10.0)
    assert limiter.retry_after("email:a") == 0
    now[0] = 5.0
    assert limiter.retry_after("email:c", "ip:1") == pytest.approx(5.0)
    now[0] = 10.0
    assert limiter.retry_after("ip:1") == 0
    limiter.failure("email:a")
    limiter.reset("email:a")
    assert limiter.retry_after("email:a") == 0


def test_summary_is_example_weighted_and_plot_renders() -> None:
    points = [
        MetricPoint(round=1, hospital="A", loss=1.0, accuracy=0.5, auc=None, num_examples=10),
        MetricPoint(round=1, hospital="B", loss=0.0, accuracy=1.0, auc=0.8, num_examples=30),
        MetricPoint(round=2, hospital="A", loss=0.5, accuracy=0.9, auc=0.9, num_examples=10),
    ]
    s = summarize(points)
    assert [x.round for x in s] == [1, 2]
    assert s[0].loss == pytest.approx(0.25) and s[0].accuracy == pytest.approx(0.875)
    assert s[0].auc == pytest.approx(0.8) and s[0].num_examples == 40
    png = metrics_png(points, title="t")
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert metrics_png([], title="empty").startswith(b"\x89PNG")


def test_round_grid_rules() -> None:
    from fedcrypt.portal.validation import Grid, RoundPeer, UpdateInfo, check_round_grid

    def info(grid: Grid | None, n: int = 5) -> UpdateInfo:
        return UpdateInfo({"scheme": "ckks"}, (1,), n, 1, 6, "f" * 64, grid)

    cal = Grid("calibration", sha(b""), 0)
    grid = Grid("calibrated", "ab" * 32, 100)
    check_round_grid(info(cal), round_number=1, peers=[], packed=True)
    check_round_grid(info(None), round_number=3, peers=[], packed=False)
    with pytest.raises(ProtocolError, match="this update is not packed"):
        check_round_grid(info(None), round_number=1, peers=[], packed=True)
    with pytest.raises(ProtocolError, match="preset is not"):
        check_round_grid(info(cal), round_number=1, peers=[], packed=False)
    with pytest.raises(ProtocolError, match="calibration-mode packed update in round 2"):
        check_round_grid(info(cal), round_number=2, peers=[])
    peer = RoundPeer(upload_id=7, hospital="A", num_examples=90, grid=grid)
    check_round_grid(info(grid, 10), round_number=2, peers=[peer])
    with pytest.raises(ProtocolError, match="above the 100"):
        check_round_grid(info(grid, 11), round_number=2, peers=[peer])
    other = Grid("calibrated", "cd" * 32, 100)
    with pytest.raises(ProtocolError, match=r"accepted update 7 \(A\)"):
        check_round_grid(info(other), round_number=2, peers=[peer])
    with pytest.raises(ProtocolError, match="this one is not"):
        check_round_grid(info(None), round_number=2, peers=[peer])
