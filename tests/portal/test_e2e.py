"""End to end: ``fedcrypt portal serve`` as a process, three hospitals run two rounds by CLI.

It runs on SQLite and, where ``FEDCRYPT_TEST_POSTGRES_URL`` names a server, on PostgreSQL
(the portal process gets ``--db``): the README's portal flow on a real PostgreSQL server.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedcrypt.protection.flatten import flatten

pytestmark = pytest.mark.slow

ADMIN_PW = "e2e-admin-password"
HOSP_PW = "e2e-hospital-pass"


def _ckks_importable() -> bool:
    try:
        import fedcrypt.protection.he.ckks
        import fedcrypt.protection.he.keys  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedcrypt.cli.main", "portal", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCRYPT_PORTAL_")}
    env.update(extra)
    return env


class Server:
    """``fedcrypt portal serve`` in a subprocess on 127.0.0.1."""

    def __init__(self, data_dir: Path, port: int, db_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "server.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                _cli(
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(self.port),
                    "--tick",
                    "0.5",
                    *(["--db", self.db_url] if self.db_url else []),
                ),
                env=_env(
                    FEDCRYPT_PORTAL_ADMIN_PASSWORD=ADMIN_PW,
                    FEDCRYPT_PORTAL_ADMIN_EMAIL="admin@example.org",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"portal exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/openapi.json", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("portal did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    db_url = None if request.param == "sqlite" else request.getfixturevalue("fresh_postgres")
    srv = Server(tmp_path / "portal-data", _free_port(), db_url)
    srv.start()
    yield srv
    srv.stop()


def _token(url: str, email: str, password: str) -> str:
    r = httpx.post(f"{url}/api/v1/auth/token", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


@pytest.mark.skipif(
    not _ckks_importable(), reason="fedcrypt.protection.he.ckks is not importable (TenSEAL missing)"
)
def test_three_hospitals_two_ckks_rounds_with_a_restart(server: Server, tmp_path: Path) -> None:
    from fedcrypt.portal.client import PortalClient
    from fedcrypt.protection.he.keys import write_key_files
    from fedcrypt.tasks.data.datasets import load_dataset
    from fedcrypt.tasks.models import create_model

    url = server.url
    admin_token = _token(url, "admin@example.org", ADMIN_PW)
    admin = {"Authorization": f"Bearer {admin_token}"}
    tokens = []
    for i in range(3):
        r = httpx.post(
            f"{url}/api/v1/hospitals",
            json={"name": f"Hospital {i}", "email": f"h{i}@example.org", "password": HOSP_PW},
        )
        assert r.status_code == 201, r.text
        approve = httpx.post(f"{url}/api/v1/hospitals/{r.json()['id']}/approve", headers=admin)
        assert approve.status_code == 200
        tokens.append(_token(url, f"h{i}@example.org", HOSP_PW))

    # the consortium's side (in-process, to keep the test fast): keys, initial model, federation
    hospital_key, server_key = write_key_files(tmp_path / "keys")
    ds = load_dataset("wdbc")
    torch.manual_seed(0)
    state = create_model("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes).state_dict()
    initial = tmp_path / "initial.pt"
    torch.save(state, initial)
    with PortalClient(url, token=admin_token) as client:
        fed = client.create_federation(
            name="e2e",
            model="mlp",
            protection="he",
            quorum=3,
            num_rounds=2,
            round_deadline_minutes=10,
            model_size=int(flatten(state).size),
        )
        client.put_server_key(fed.id, server_key)
        client.put_initial_model(fed.id, initial)
    key_args = ["--key", str(hospital_key)]

    # three hospitals, three processes, the whole loop each
    procs = []
    for i, tok in enumerate(tokens):
        cmd = _cli(
            "participate",
            "e2e",
            "--rounds",
            "2",
            "--client-id",
            str(i),
            "--num-clients",
            "3",
            "--out",
            str(tmp_path / f"h{i}"),
            "--poll",
            "0.3",
            "--timeout",
            "180",
            "--url",
            url,
            *key_args,
        )
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(FEDCRYPT_PORTAL_TOKEN=tok),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    # restart the portal mid-federation (round 2 partly uploaded): nothing is lost
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rounds = httpx.get(f"{url}/api/v1/federations/{fed.id}/rounds", headers=admin).json()
        if any(r["number"] == 2 and r["num_uploads"] >= 1 for r in rounds):
            break
        time.sleep(0.2)
    server.stop()
    server.start()
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out

    # the final model every hospital decrypted is the example-weighted FedAvg of the
    # three hospitals' round-2 local models
    records = [
        json.loads((tmp_path / f"h{i}" / "participation.json").read_text()) for i in range(3)
    ]
    locals_, weights = [], []
    for rec in records:
        r2 = rec["rounds"][-1]
        assert r2["round"] == 2 and rec["rounds"][0]["round"] == 1
        locals_.append(flatten(torch.load(r2["local_model"], weights_only=True)))
        weights.append(r2["num_examples"])
    fedavg = sum(w * v for w, v in zip(weights, locals_, strict=True)) / sum(weights)
    tol = 1e-3  # CKKS noise at the "fast" preset is orders of magnitude smaller
    for rec in records:
        final = flatten(torch.load(rec["rounds"][-1]["global_model"], weights_only=True))
        np.testing.assert_allclose(final, fedavg, atol=tol)

    # the portal saw metrics for both rounds, and only ciphertexts under ckks
    final_fed = httpx.get(f"{url}/api/v1/federations/{fed.id}", headers=admin).json()
    assert final_fed["status"] == "finished"
    for number in (1, 2):
        ms = httpx.get(
            f"{url}/api/v1/federations/{fed.id}/rounds/{number}/metrics", headers=admin
        ).json()
        assert len(ms) == 3
    # the portal's disk holds ciphertexts, the public key and the initial model: no secret
    secret = hospital_key.read_bytes()
    public = (final_fed["initial_model_sha256"], final_fed["server_key_sha256"])
    blobs = [p.read_bytes() for p in (server.data_dir / "blobs").rglob("*") if p.is_file()]
    assert secret not in blobs
    for data in blobs:
        if hashlib.sha256(data).hexdigest() not in public:  # updates and aggregates
            assert data.startswith(b"FCRY") and b'"scheme":"he"' in data[:4096]
    assert "Traceback" not in server.log.read_text()
