"""End to end, the README's secagg portal flow: ``fedcrypt portal serve`` as a process,
``fedcrypt keys generate --protection secagg``, ``create-federation --protection secagg
--registry``, and three hospitals running two rounds with ``participate`` (one process
each), with a portal restart in the middle of round 2's session.

Checks that the three final models are identical and equal the plain FedAvg of the
hospitals' round-2 local models within the quantization bound, that the portal held no
secret and could not read the aggregates, and prints the round wall times and the bytes
each hospital exchanged per round (also in ``secagg-e2e.json`` under the test's folder).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_e2e import ADMIN_PW, HOSP_PW, Server, _cli, _env, _free_port, _token

from fedcrypt.portal.secagg import params_from_json
from fedcrypt.protection.flatten import flatten
from fedcrypt.protection.secagg import decode_aggregate

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> object:
    """The portal on SQLite (the PostgreSQL run of the same flow is ``test_e2e.py``'s he)."""
    srv = Server(tmp_path / "portal-data", _free_port())
    srv.start()
    yield srv
    srv.stop()


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(args, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("restart", [False, True], ids=["steady", "restart"])
def test_three_hospitals_two_secagg_rounds(server: Server, tmp_path: Path, restart: bool) -> None:
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
        assert httpx.post(f"{url}/api/v1/hospitals/{r.json()['id']}/approve", headers=admin)
        tokens.append(_token(url, f"h{i}@example.org", HOSP_PW))

    # the consortium's side, as in the README
    keys = tmp_path / "keys"
    import sys

    _run(sys.executable, "-m", "fedcrypt.cli.main", "keys", "generate", "--protection",
         "secagg", "--hospitals", "3", "--out", str(keys))  # fmt: skip
    initial = tmp_path / "initial.pt"
    _run(*_cli("init-model", "--model", "mlp", "--dataset", "wdbc", "-o", str(initial)))
    out = _run(
        *_cli(
            "create-federation", "--name", "demo", "--model", "mlp", "--dataset", "wdbc",
            "--initial-model", str(initial), "--protection", "secagg",
            "--registry", str(keys / "registry.pub"), "--quorum", "3", "--rounds", "2",
            "--deadline-minutes", "10", "--url", url,
        ),
        env=_env(FEDCRYPT_PORTAL_TOKEN=admin_token),
    )  # fmt: skip
    assert "--group-mask-key group-mask.key" in out and "hospital-ID.key" in out

    t0 = time.monotonic()
    procs = []
    for i, tok in enumerate(tokens):
        cmd = _cli(
            "participate", "demo", "--rounds", "2",
            "--key", str(keys / f"hospital-{i}.key"),
            "--group-mask-key", str(keys / "group-mask.key"),
            "--client-id", str(i), "--num-clients", "3",
            "--out", str(tmp_path / f"h{i}"), "--poll", "0.3", "--timeout", "240", "--url", url,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(FEDCRYPT_PORTAL_TOKEN=tok),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    fed_id = httpx.get(f"{url}/api/v1/federations", headers=admin).json()[0]["id"]
    if restart:  # in the middle of round 2's session: the portal rebuilds it from its records
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rounds = httpx.get(f"{url}/api/v1/federations/{fed_id}/rounds", headers=admin).json()
            if any(r["number"] == 2 and r["stage"] in ("share", "masked_input") for r in rounds):
                break
            time.sleep(0.1)
        server.stop()
        server.start()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, text in enumerate(outputs):
        (tmp_path / f"h{i}.log").write_text(text)
    wall = time.monotonic() - t0
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text

    records = [
        json.loads((tmp_path / f"h{i}" / "participation.json").read_text()) for i in range(3)
    ]
    fed = httpx.get(f"{url}/api/v1/federations/{fed_id}", headers=admin).json()
    assert fed["status"] == "finished" and fed["protection"] == "secagg"
    params = params_from_json(fed["secagg_params"])
    finals = [
        flatten(torch.load(rec["rounds"][-1]["global_model"], weights_only=True)) for rec in records
    ]
    for final in finals[1:]:
        np.testing.assert_array_equal(final, finals[0])  # the same final model, bit for bit
    r2 = [rec["rounds"][-1] for rec in records]
    assert all(x["round"] == 2 and x["contributed"] for x in r2)
    locals_ = [flatten(torch.load(x["local_model"], weights_only=True)) for x in r2]
    weights = [x["num_examples"] for x in r2]
    fedavg = sum(w * v for w, v in zip(weights, locals_, strict=True)) / sum(weights)
    bound = params.error_bound(3, sum(weights))
    assert np.max(np.abs(finals[0] - fedavg)) <= bound + 1e-9

    # the portal: metrics of both rounds; no secret on its disk; aggregates it cannot read
    for number in (1, 2):
        ms = httpx.get(
            f"{url}/api/v1/federations/{fed_id}/rounds/{number}/metrics", headers=admin
        ).json()
        assert len(ms) == 3
    secrets_ = [(keys / f"hospital-{i}.key").read_bytes() for i in range(3)]
    secrets_.append((keys / "group-mask.key").read_bytes())
    blobs = [p.read_bytes() for p in (server.data_dir / "blobs").rglob("*") if p.is_file()]
    assert not any(s in b for s in secrets_ for b in blobs)
    agg = httpx.get(f"{url}/api/v1/federations/{fed_id}/rounds/2/aggregate", headers=admin).content
    with pytest.raises(Exception, match="consortium key is required"):
        decode_aggregate(agg, params=params)
    assert "Traceback" not in server.log.read_text()

    # what it cost: per round, wall time (join to unmasked aggregate) and bytes per hospital
    rounds = httpx.get(f"{url}/api/v1/federations/{fed_id}/rounds", headers=admin).json()
    figures = {
        "wall_seconds_all": wall,
        "rounds": [
            {
                "round": rd["number"],
                "portal_seconds": (
                    np.datetime64(rd["aggregated_at"][:26]) - np.datetime64(rd["opened_at"][:26])
                )
                / np.timedelta64(1, "s"),
                "hospital_round_seconds": [rec["rounds"][k]["round_seconds"] for rec in records],
                "bytes_up": [rec["rounds"][k]["upload_bytes"] for rec in records],
                "bytes_down": [rec["rounds"][k]["download_bytes"] for rec in records],
                "aggregate_bytes": rd["aggregate_size"],
                "model_values": fed["model_size"],
            }
            for k, rd in enumerate(rounds)
        ],
    }
    (tmp_path / "secagg-e2e.json").write_text(json.dumps(figures, indent=2))
    print(f"\nsecagg e2e ({'restart' if restart else 'steady'}):", json.dumps(figures))
    print(outputs[0])
