"""Federations carry their settings; the admin corrects them before round 1 or cancels."""

from __future__ import annotations

import re
import shlex
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from portal_helpers import ADMIN_EMAIL, ADMIN_PASSWORD, Api, plain_update, sha

from fedcrypt.portal.schemas import BUILTIN_MODELS, OVERRIDABLE

FEDS = "/api/v1/federations"

SETTINGS: dict[str, Any] = {
    "name": "chest x-ray",
    "model": "mobilenetv2",
    "dataset": "pneumoniamnist",
    "local_epochs": 3,
    "lr": 0.0005,
    "batch_size": 16,
    "image_size": 64,
    "local_overrides": ["batch_size", "lr"],
    "protection": "he",
    "he_preset": "packed",
    "quorum": 3,
    "num_rounds": 5,
}


def _create(api: Api, **fields: Any) -> Any:
    return api.client.post(FEDS, json={**SETTINGS, **fields}, headers=api.admin)


def test_a_federation_stores_and_shows_its_settings(api: Api) -> None:
    r = _create(api)
    assert r.status_code == 201, r.text
    fed = r.json()
    for key, value in SETTINGS.items():
        want = ["lr", "batch_size"] if key == "local_overrides" else value  # canonical order
        assert fed[key] == want, key
    assert fed["task"] is None and fed["status"] == "draft"
    _, headers = api.hospital()
    seen = api.client.get(f"{FEDS}/{fed['id']}", headers=headers).json()
    assert seen["local_epochs"] == 3 and seen["image_size"] == 64
    cmd = shlex.split(seen["join_command"])
    assert cmd[:4] == ["fedcrypt", "portal", "participate", "chest x-ray"]
    assert cmd[cmd.index("--url") + 1] == "http://testserver"
    assert cmd[cmd.index("--key") + 1] == "hospital.key"
    assert "--data-dir" in cmd and cmd[cmd.index("--rounds") + 1] == "5"
    assert "--dataset" not in cmd and "--lr" not in cmd  # they come from the federation


def test_defaults_and_the_join_command_of_a_plain_wdbc_federation(api: Api) -> None:
    fed = api.client.post(
        FEDS, json={"name": "wdbc", "protection": "plain", "dataset": "wdbc"}, headers=api.admin
    ).json()
    assert (fed["model"], fed["local_epochs"], fed["batch_size"], fed["lr"]) == ("mlp", 1, 32, None)
    assert fed["local_overrides"] == []
    cmd = shlex.split(fed["join_command"])
    assert "--key" not in cmd and "--data-dir" not in cmd


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "mlpp"}, "unknown model 'mlpp'"),
        ({"model": "../../etc/passwd.py:x"}, "unknown model"),
        ({"model": "os.system"}, "unknown model"),
        ({"task": "not a reference"}, "task reference"),
        ({"task": "tasks.chest:TASK"}, "not both"),
        ({"dataset": "/data/pneumonia.npz"}, "each hospital points at its own copy"),
        ({"local_overrides": ["model"]}, "cannot be overridden locally"),
        ({"protection": "secagg", "he_preset": None, "quorum": 1}, "quorum must be >= 2"),
        ({"protection": "secagg"}, "'he' only"),
        ({"protection": "rot13"}, "unknown protection"),
        ({"he_preset": "ultra"}, "unknown HE preset"),
        ({"protection": "plain", "he_preset": "packed"}, "'he' only"),
        ({"local_epochs": 0}, "greater than or equal to 1"),
        ({"lr": -1}, "greater than 0"),
        ({"batch_size": 10**9}, "less than or equal to 65536"),
        ({"image_size": 10**6}, "less than or equal to 2048"),
    ],
)
def test_settings_are_validated_at_creation(api: Api, fields: dict[str, Any], message: str) -> None:
    r = _create(api, **fields)
    assert r.status_code == 422
    assert message in r.text, r.text


@pytest.mark.parametrize(
    "model", [*BUILTIN_MODELS, "MLP", "hospital_tasks.chest:task", "tasks/chest.py:build_task"]
)
def test_model_names_and_task_references_are_accepted(api: Api, model: str) -> None:
    r = _create(api, name=f"m {len(model)}", model=model)
    assert r.status_code == 201, r.text
    assert r.json()["model"] == (model.lower() if model.lower() in BUILTIN_MODELS else model)


def test_the_builtin_model_names_cover_the_model_registry() -> None:
    from fedcrypt.tasks.models import MODELS

    assert set(MODELS) <= set(BUILTIN_MODELS)
    assert set(OVERRIDABLE) == {"local_epochs", "lr", "batch_size", "image_size"}


def test_corrections_before_round_one_and_not_after(api: Api) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=2, local_epochs=1)
    c = api.client
    # running, round 1 open, no upload yet: training settings can be corrected
    r = c.patch(f"{FEDS}/{fid}", json={"local_epochs": 4, "lr": 0.01}, headers=api.admin)
    assert (
        r.status_code == 200 and r.json()["local_epochs"] == 4 and r.json()["status"] == "running"
    )
    r = c.patch(f"{FEDS}/{fid}", json={"lr": None}, headers=api.admin)  # null clears
    assert r.status_code == 200 and r.json()["lr"] is None
    r = c.patch(f"{FEDS}/{fid}", json={"batch_size": None}, headers=api.admin)
    assert r.status_code == 409 and "cannot be cleared" in r.json()["detail"]
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    for body in ({"local_epochs": 2}, {"model": "cnn"}, {"local_overrides": ["lr"]}):
        r = c.patch(f"{FEDS}/{fid}", json=body, headers=api.admin)
        assert r.status_code == 409 and "once round 1 has an upload" in r.json()["detail"]
    r = c.patch(f"{FEDS}/{fid}", json={"quorum": 1, "num_rounds": 3}, headers=api.admin)
    assert r.status_code == 200  # these change at any time
    r = c.patch(f"{FEDS}/{fid}", json={"role": "x"}, headers=api.admin)
    assert r.status_code == 422


def test_a_model_correction_returns_a_running_federation_to_draft(api: Api) -> None:
    fid = api.federation(quorum=2)
    c = api.client
    before = c.get(f"{FEDS}/{fid}", headers=api.admin).json()
    r = c.patch(f"{FEDS}/{fid}", json={"model": "cnn", "model_size": 7}, headers=api.admin)
    assert r.status_code == 200, r.text
    fed = r.json()
    assert fed["status"] == "draft" and fed["model"] == "cnn" and fed["current_round"] is None
    assert fed["initial_model_sha256"] is None
    assert not api.portal.store.exists(before["initial_model_sha256"])  # no orphan blob
    blob = b"a new initial state_dict"
    r = c.put(
        f"{FEDS}/{fid}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob), "X-Model-Size": "7"},
    )
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert r.json()["current_round"] == 1


def test_changing_the_protection_of_a_draft_drops_its_server_key(
    api: Api, ckks_keys: tuple[bytes, bytes]
) -> None:
    _, server_key = ckks_keys
    fid = api.federation(protection="he", server_key=server_key, publish=False)
    key_sha = api.client.get(f"{FEDS}/{fid}", headers=api.admin).json()["server_key_sha256"]
    r = api.client.patch(f"{FEDS}/{fid}", json={"protection": "plain"}, headers=api.admin)
    assert r.status_code == 409 and "'he' only" in r.json()["detail"]  # the preset stays
    r = api.client.patch(
        f"{FEDS}/{fid}", json={"protection": "plain", "he_preset": None}, headers=api.admin
    )
    assert r.status_code == 200
    fed = r.json()
    assert fed["protection"] == "plain" and fed["server_key_sha256"] is None
    assert fed["key_fingerprint"] is None and fed["he_preset"] is None
    assert not api.portal.store.exists(key_sha)


def test_cancel_a_federation(api: Api) -> None:
    _, a = api.hospital()
    fid = api.federation(quorum=2)
    api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    c = api.client
    assert c.post(f"{FEDS}/{fid}/cancel", json={"reason": "x"}, headers=a).status_code == 403
    r = c.post(f"{FEDS}/{fid}/cancel", json={"reason": "wrong dataset"}, headers=api.admin)
    assert r.status_code == 200
    fed = r.json()
    assert fed["status"] == "cancelled" and fed["cancel_reason"] == "wrong dataset"
    assert fed["cancelled_at"] is not None
    r = api.upload(fid, 1, plain_update(np.ones(6), 1), a)
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert "wrong dataset" in r.json()["detail"]
    assert api.round(fid, 1)["status"] == "cancelled"
    assert c.post(f"{FEDS}/{fid}/cancel", json={}, headers=api.admin).status_code == 409
    assert c.patch(f"{FEDS}/{fid}", json={"quorum": 1}, headers=api.admin).status_code == 409
    r = c.post(f"{FEDS}/{fid}/rounds/1/aggregate", headers=api.admin)
    assert r.status_code == 409
    events = c.get("/api/v1/audit?action=federation.cancel", headers=api.admin).json()
    assert events and events[0]["detail"] == "wrong dataset"


# --- pages ------------------------------------------------------------------------------

_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def _admin_browser(api: Api) -> TestClient:
    b = TestClient(api.app)
    token = _CSRF.search(b.get("/login").text).group(1)  # type: ignore[union-attr]
    b.post("/login", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": token})
    return b


def test_the_pages_show_settings_join_command_and_let_the_admin_correct_and_cancel(
    api: Api,
) -> None:
    fid = _create(api, name="pneumo").json()["id"]
    b = _admin_browser(api)
    page = b.get(f"/federations/{fid}/edit")
    assert page.status_code == 200 and 'value="mobilenetv2"' in page.text
    token = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    form = {
        "csrf_token": token,
        "model": "cnn",
        "dataset": "pneumoniamnist",
        "local_epochs": "2",
        "lr": "0.0005",
        "batch_size": "16",
        "image_size": "64",
        "local_overrides": ["lr"],
        "protection": "he",
        "he_preset": "packed",
        "quorum": "3",
        "round_deadline_minutes": "60",
        "num_rounds": "5",
    }
    r = b.post(f"/federations/{fid}/edit", data=form)
    assert r.status_code == 200, r.text
    fed = api.client.get(f"{FEDS}/{fid}", headers=api.admin).json()
    assert (fed["model"], fed["local_epochs"], fed["local_overrides"]) == ("cnn", 2, ["lr"])
    bad = b.post(f"/federations/{fid}/edit", data={**form, "model": "nope"})
    assert bad.status_code == 422 and "unknown model" in bad.text
    # a hospital sees the exact join command once the federation runs
    blob = b"initial"
    plain = api.client.post(
        FEDS, json={"name": "runs", "protection": "plain", "dataset": "wdbc"}, headers=api.admin
    ).json()
    api.client.put(
        f"{FEDS}/{plain['id']}/initial-model",
        content=blob,
        headers={**api.admin, "X-Content-SHA256": sha(blob)},
    )
    page = b.get(f"/federations/{plain['id']}")
    assert "fedcrypt portal participate runs --url http://testserver --rounds 10" in page.text
    assert "nothing: every hospital trains with these settings" in page.text
    token = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    r = b.post(f"/federations/{plain['id']}/cancel", data={"csrf_token": token, "reason": "demo"})
    assert r.status_code == 200 and "Cancelled" in r.text and "demo" in r.text
