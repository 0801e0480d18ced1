"""Helpers of the secagg relay tests: a consortium's key files, hospitals that poll the API."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from portal_helpers import MODEL_SIZE, Api, sha

from fedcrypt.portal.secagg import params_from_json, sign_enrolment
from fedcrypt.protection.secagg import STAGES, SecAggHospital, SecAggParams
from fedcrypt.protection.secagg.keys import (
    ConsortiumKeys,
    Registry,
    generate_consortium,
    group_mask_from_bytes,
    identity_from_bytes,
    registry_from_bytes,
)

API = "/api/v1"


@dataclass
class Consortium:
    """A consortium's key files (bytes) and parsed registry."""

    keys: ConsortiumKeys
    registry: Registry

    @property
    def group_mask(self) -> bytes | None:
        if self.keys.group_mask is None:
            return None
        return group_mask_from_bytes(self.keys.group_mask).key

    def signing_key(self, hid: int) -> Any:
        return identity_from_bytes(self.keys.identities[hid]).signing_key

    def hospital(self, hid: int, params: SecAggParams) -> SecAggHospital:
        """A fresh protocol object for hospital ``hid`` (no state file)."""
        return SecAggHospital(
            hid,
            signing_key=self.signing_key(hid),
            registry=self.registry.keys,
            params=params,
            consortium_key=self.group_mask,
        )


def consortium(n: int, *, group_mask: bool = True) -> Consortium:
    keys = generate_consortium(n, group_mask=group_mask)
    return Consortium(keys=keys, registry=registry_from_bytes(keys.registry))


@dataclass
class Site:
    """One hospital: its account, registry id, protocol object and update."""

    hid: int
    user_id: int
    headers: dict[str, str]
    hospital: SecAggHospital
    update: np.ndarray
    num_examples: int
    #: stage -> True: stop answering from that stage on (a dropout).
    stop_at: str | None = None
    sent: list[tuple[str, bytes]] = field(default_factory=list)


def secagg_federation(
    api: Api,
    cons: Consortium,
    *,
    name: str = "sa",
    quorum: int = 2,
    rounds: int = 2,
    deadline_minutes: float = 30,
) -> int:
    body = {
        "name": name,
        "model": "mlp",
        "protection": "secagg",
        "quorum": quorum,
        "num_rounds": rounds,
        "round_deadline_minutes": deadline_minutes,
        "model_size": MODEL_SIZE,
    }
    r = api.client.post(f"{API}/federations", json=body, headers=api.admin)
    assert r.status_code == 201, r.text
    fid = int(r.json()["id"])
    r = api.client.put(
        f"{API}/federations/{fid}/registry", content=cons.keys.registry, headers=api.admin
    )
    assert r.status_code == 200, r.text
    blob = b"opaque initial state_dict bytes"
    headers = {**api.admin, "X-Content-SHA256": sha(blob)}
    r = api.client.put(f"{API}/federations/{fid}/initial-model", content=blob, headers=headers)
    assert r.status_code == 200, r.text
    return fid


def federation_params(api: Api, fid: int) -> SecAggParams:
    fed = api.client.get(f"{API}/federations/{fid}", headers=api.admin).json()
    return params_from_json(fed["secagg_params"])


def enrol(api: Api, fid: int, cons: Consortium, hid: int, headers: dict[str, str]) -> Any:
    me = api.client.get(f"{API}/users/me", headers=headers).json()
    signature = sign_enrolment(
        cons.signing_key(hid),
        registry_fingerprint=cons.registry.fingerprint,
        federation_id=fid,
        account_id=me["id"],
        hospital_id=hid,
    )
    return api.client.post(
        f"{API}/federations/{fid}/secagg/members",
        json={"hospital_id": hid, "signature": signature},
        headers=headers,
    )


def make_sites(
    api: Api,
    fid: int,
    cons: Consortium,
    n: int,
    *,
    rng: np.random.Generator,
    params: SecAggParams | None = None,
) -> list[Site]:
    """Register, approve and enrol hospitals ``0 .. n-1`` with random small updates."""
    params = params or federation_params(api, fid)
    sites = []
    for hid in range(n):
        uid, headers = api.hospital(f"Hospital {hid}")
        r = enrol(api, fid, cons, hid, headers)
        assert r.status_code == 201, r.text
        sites.append(
            Site(
                hid=hid,
                user_id=uid,
                headers=headers,
                hospital=cons.hospital(hid, params),
                update=rng.normal(0, 0.05, size=MODEL_SIZE),
                num_examples=int(rng.integers(20, 200)),
            )
        )
    return sites


def turn(api: Api, fid: int, number: int, site: Site) -> dict[str, Any]:
    r = api.client.get(f"{API}/federations/{fid}/rounds/{number}/secagg/turn", headers=site.headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def answer(site: Site, stage: str, request: bytes) -> bytes:
    """The hospital's reply to one stage."""
    h = site.hospital
    if stage == "advertise":
        return h.stage_advertise(request)
    if stage == "share":
        return h.stage_share(request)
    if stage == "masked_input":
        return h.stage_masked_input(request, update=site.update, num_examples=site.num_examples)
    if stage == "consistency":
        return h.stage_consistency(request)
    return h.stage_unmask(request)


def put_reply(api: Api, fid: int, number: int, site: Site, reply: bytes) -> Any:
    headers = {**site.headers, "X-Content-SHA256": sha(reply)}
    return api.client.put(
        f"{API}/federations/{fid}/rounds/{number}/secagg/reply", content=reply, headers=headers
    )


def get_request(api: Api, fid: int, number: int, site: Site) -> tuple[str, bytes]:
    r = api.client.get(
        f"{API}/federations/{fid}/rounds/{number}/secagg/request", headers=site.headers
    )
    assert r.status_code == 200, r.text
    return r.headers["x-secagg-stage"], r.content


Hook = Callable[[Site, str, bytes], bytes | None]


def step(
    api: Api,
    fid: int,
    number: int,
    sites: list[Site],
    *,
    until_stage: str | None = None,
    hook: Hook | None = None,
) -> int:
    """Let every site act on its turn until none has anything to do; return the actions.

    A site stops answering at its ``stop_at`` stage. ``until_stage``: stop once the
    session reaches that stage (before anyone answers it). ``hook(site, stage, reply)``
    may replace a reply (or return None to send nothing).
    """
    acted = 0
    while True:
        progress = False
        for site in sites:
            t = turn(api, fid, number, site)
            if until_stage is not None and t["stage"] == until_stage:
                return acted
            if t["action"] == "join":
                if site.stop_at == "join":
                    continue
                r = api.client.post(
                    f"{API}/federations/{fid}/rounds/{number}/secagg/join", headers=site.headers
                )
                assert r.status_code == 200, r.text
                progress = True
            elif t["action"] == "answer":
                stage = t["stage"]
                if site.stop_at is not None and STAGES.index(stage) >= STAGES.index(site.stop_at):
                    continue
                got, request = get_request(api, fid, number, site)
                assert got == stage
                reply: bytes | None = answer(site, stage, request)
                if hook is not None:
                    reply = hook(site, stage, reply)  # type: ignore[arg-type]
                if reply is None:
                    continue
                r = put_reply(api, fid, number, site, reply)
                assert r.status_code == 200, r.text
                site.sent.append((stage, reply))
                progress = True
        if not progress:
            return acted
        acted += 1


def fedavg(sites: list[Site], ids: Mapping[int, bool] | list[int]) -> tuple[np.ndarray, int]:
    chosen = [s for s in sites if s.hid in ids]
    total = sum(s.num_examples for s in chosen)
    mean = sum(s.num_examples * np.clip(s.update, -4, 4) for s in chosen) / total
    return np.asarray(mean), total


def sessions(api: Api, fid: int, number: int) -> list[dict[str, Any]]:
    r = api.client.get(f"{API}/federations/{fid}/rounds/{number}/secagg", headers=api.admin)
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def aggregate(api: Api, fid: int, number: int, headers: dict[str, str]) -> bytes:
    r = api.client.get(f"{API}/federations/{fid}/rounds/{number}/aggregate", headers=headers)
    assert r.status_code == 200, r.text
    return r.content
