"""``fedcrypt portal`` commands against an in-process portal (Starlette's TestClient)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from argon2 import PasswordHasher
from pydantic import SecretStr

warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
from fastapi.testclient import TestClient  # noqa: E402

from fedcrypt.cli import portal as portal_cli  # noqa: E402
from fedcrypt.cli.main import main  # noqa: E402
from fedcrypt.portal import security  # noqa: E402
from fedcrypt.portal.app import create_app  # noqa: E402
from fedcrypt.portal.client import PortalClient  # noqa: E402
from fedcrypt.portal.config import PortalSettings, default_db_url  # noqa: E402
from fedcrypt.portal.services import accounts  # noqa: E402
from fedcrypt.protection.flatten import flatten  # noqa: E402

ADMIN = "admin@example.org"
ADMIN_PW = "admin-password-1"
HOSP_PW = "hospital-pass-1"


def _run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["fedcrypt", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    code = info.value.code
    return (int(code) if code is not None else 0), out.out, out.err


@pytest.fixture
def portal_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A portal served in-process; ``make_client`` talks to it."""
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(security, "_hasher", hasher)
    monkeypatch.setattr(security, "_DUMMY_HASH", hasher.hash("dummy-password"))
    settings = PortalSettings(
        db_url=default_db_url(tmp_path / "srv"),
        data_dir=tmp_path / "srv",
        secret_key=SecretStr("s" * 32),
        tick_interval_s=0,
    )
    app = create_app(settings)
    accounts.create_admin(app.state.portal, email=ADMIN, password=ADMIN_PW)
    http = TestClient(app)
    monkeypatch.setattr(
        portal_cli,
        "make_client",
        lambda url, token: PortalClient("http://testserver", token=token, http=http),
    )
    monkeypatch.delenv("FEDCRYPT_PORTAL_TOKEN", raising=False)
    yield http
    app.state.portal.close()


def _token(
    email: str, password: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", password)
    code, out, err = _run(["portal", "token", "--email", email], monkeypatch, capsys)
    assert code == 0, err
    assert "shown once" in err
    return out.strip()


def _plain_federation(
    name: str,
    *,
    hospitals: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...] = (),
) -> tuple[str, Path]:
    """Register and approve ``hospitals``, create a 2-round plain federation (quorum 1).

    Returns the admin token and the initial model's path.
    """
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", HOSP_PW)
    for hospital in hospitals:
        run(["portal", "register", "--name", hospital, "--email", f"{hospital}@example.org"])
    admin = _token(ADMIN, ADMIN_PW, monkeypatch, capsys)
    for hospital in hospitals:
        run(["portal", "approve", f"{hospital}@example.org", "--token", admin])
    initial = tmp_path / "initial.pt"
    run(["portal", "init-model", "-o", str(initial)])
    code, out, _ = run(
        [
            "portal", "create-federation", "--name", name, "--initial-model", str(initial),
            "--protection", "plain", "--quorum", "1", "--rounds", "2", *extra, "--token", admin,
        ]
    )  # fmt: skip
    assert code == 0, out
    return admin, initial


def test_hospital_and_admin_workflow(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", HOSP_PW)
    for i in (1, 2):
        code, out, _ = run(
            ["portal", "register", "--name", f"Hospital {i}", "--email", f"h{i}@example.org"]
        )
        assert code == 0 and "pending" in out
    code, _, err = run(["portal", "token", "--email", "h1@example.org"])
    assert code == 2 and err.count("\n") == 1 and "awaiting approval" in err

    admin = _token(ADMIN, ADMIN_PW, monkeypatch, capsys)
    code, out, _ = run(["portal", "hospitals", "--status", "pending", "--token", admin])
    assert code == 0 and "h1@example.org" in out and "h2@example.org" in out
    for i in (1, 2):
        code, out, _ = run(["portal", "approve", f"h{i}@example.org", "--token", admin])
        assert code == 0 and "approved" in out
    code, _, err = run(["portal", "approve", "nobody@example.org", "--token", admin])
    assert code == 2 and "no hospital" in err

    initial = tmp_path / "initial.pt"
    code, out, _ = run(["portal", "init-model", "-o", str(initial)])
    assert code == 0 and "values" in out
    code, out, _ = run(
        [
            "portal",
            "create-federation",
            "--name",
            "demo",
            "--initial-model",
            str(initial),
            "--protection",
            "plain",
            "--quorum",
            "2",
            "--rounds",
            "1",
            "--token",
            admin,
        ]
    )
    assert code == 0 and "round 1 is open" in out, out
    code, _, err = run(
        [
            "portal",
            "create-federation",
            "--name",
            "enc",
            "--initial-model",
            str(initial),
            "--token",
            admin,
        ]
    )
    assert code == 2 and "--server-key" in err

    tokens = [_token(f"h{i}@example.org", HOSP_PW, monkeypatch, capsys) for i in (1, 2)]
    code, out, _ = run(["portal", "federations", "--token", tokens[0]])
    assert code == 0 and "demo" in out

    state = torch.load(initial, weights_only=True)
    updates = []
    for i, (tok, n) in enumerate(zip(tokens, (10, 30), strict=True)):
        local = {k: v + (i + 1) for k, v in state.items()}
        updates.append((flatten(local), n))
        torch.save(local, tmp_path / f"local{i}.pt")
        prot = tmp_path / f"update{i}.fcry"
        code, out, _ = run(
            [
                "portal",
                "protect",
                str(tmp_path / f"local{i}.pt"),
                "-o",
                str(prot),
                "--num-examples",
                str(n),
                "--protection",
                "plain",
            ]
        )
        assert code == 0
        code, out, err = run(["portal", "upload", "demo", str(prot), "--token", tok])
        assert code == 0, err
        assert f"{n} examples" in out
    code, out, _ = run(["portal", "status", "demo", "--token", tokens[0]])
    assert code == 0 and "aggregated" in out

    agg = tmp_path / "agg.fcry"
    code, out, _ = run(
        ["portal", "download", "demo", "--round", "1", "-o", str(agg), "--token", tokens[1]]
    )
    assert code == 0 and agg.is_file()
    merged = tmp_path / "global.pt"
    code, out, _ = run(
        [
            "portal",
            "decrypt",
            str(agg),
            "--like",
            str(initial),
            "-o",
            str(merged),
            "--protection",
            "plain",
        ]
    )
    assert code == 0 and "2 updates over 40 examples" in out
    expected = (updates[0][0] * 10 + updates[1][0] * 30) / 40
    np.testing.assert_allclose(flatten(torch.load(merged, weights_only=True)), expected, atol=1e-6)

    code, out, _ = run(
        [
            "portal",
            "report",
            "demo",
            "--loss",
            "0.3",
            "--accuracy",
            "0.9",
            "--auc",
            "0.95",
            "--num-examples",
            "50",
            "--token",
            tokens[0],
        ]
    )
    assert code == 0 and "reported round 1" in out
    code, out, _ = run(
        [
            "portal",
            "download",
            "demo",
            "--initial",
            "-o",
            str(tmp_path / "i.pt"),
            "--token",
            tokens[0],
        ]
    )
    assert code == 0 and (tmp_path / "i.pt").read_bytes() == initial.read_bytes()
    # a closed round refuses re-uploads with the portal's reason on one line
    code, _, err = run(
        [
            "portal",
            "upload",
            "demo",
            str(tmp_path / "update0.fcry"),
            "--round",
            "1",
            "--token",
            tokens[0],
        ]
    )
    assert code == 2 and "HTTP 409" in err and "closed" in err


def test_cli_errors_are_one_line(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    code, _, err = run(["portal", "federations"])
    assert code == 2 and "no API token" in err
    code, _, err = run(["portal", "federations", "--token", "fcp_bad.token"])
    assert code == 2 and "HTTP 401" in err and err.count("\n") == 1
    admin = _token(ADMIN, ADMIN_PW, monkeypatch, capsys)
    code, _, err = run(["portal", "status", "nope", "--token", admin])
    assert code == 2 and "no federation named 'nope'" in err
    code, _, err = run(["portal", "upload", "1", str(tmp_path / "missing"), "--token", admin])
    assert code == 2 and "not found" in err
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", "wrong-password!")
    code, _, err = run(["portal", "token", "--email", ADMIN])
    assert code == 2 and "wrong e-mail address or password" in err


def test_unreachable_portal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        ["portal", "federations", "--url", "http://127.0.0.1:9", "--token", "fcp_a.b"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "cannot reach the portal" in err


def test_serve_refuses_to_start_without_an_admin_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FEDCRYPT_PORTAL_ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = _run(["portal", "serve", "--data-dir", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 2 and "FEDCRYPT_PORTAL_ADMIN_PASSWORD" in err
    monkeypatch.setenv("FEDCRYPT_PORTAL_ADMIN_PASSWORD", "short")
    code, _, err = _run(["portal", "serve", "--data-dir", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 2 and "at least 12" in err
    assert (tmp_path / "d" / "portal-secret").stat().st_mode & 0o077 == 0


def test_participate_in_process(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    _plain_federation(
        "solo", hospitals=("solo",), tmp_path=tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    tok = _token("solo@example.org", HOSP_PW, monkeypatch, capsys)
    out_dir = tmp_path / "hospital"
    code, out, err = run(
        [
            "portal",
            "participate",
            "solo",
            "--rounds",
            "5",
            "--out",
            str(out_dir),
            "--poll",
            "0.05",
            "--token",
            tok,
        ]
    )
    assert code == 0, err
    assert "done: 2 rounds" in out  # the federation has two rounds
    assert (out_dir / "round-2" / "global.pt").is_file()
    # with one hospital the global model is its own local model
    local = flatten(torch.load(out_dir / "round-2" / "local.pt", weights_only=True))
    final = flatten(torch.load(out_dir / "round-2" / "global.pt", weights_only=True))
    np.testing.assert_allclose(final, local, atol=1e-6)
    code, _, err = run(["portal", "participate", "solo", "--token", tok, "--out", str(out_dir)])
    assert code == 2 and "finished" in err


def test_participate_joins_a_running_federation(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    _, initial = _plain_federation(
        "running",
        hospitals=("early", "late"),
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
        extra=("--deadline-minutes", "0.001"),
    )
    early = _token("early@example.org", HOSP_PW, monkeypatch, capsys)
    state = torch.load(initial, weights_only=True)
    update = tmp_path / "early.fcry"
    run(
        [
            "portal",
            "protect",
            str(initial),
            "-o",
            str(update),
            "--num-examples",
            "5",
            "--protection",
            "plain",
        ]
    )
    code, _, err = run(["portal", "upload", "running", str(update), "--token", early])
    assert code == 0, err
    late = _token("late@example.org", HOSP_PW, monkeypatch, capsys)
    out_dir = tmp_path / "late"
    code, out, err = run(
        [
            "portal",
            "participate",
            "running",
            "--rounds",
            "1",
            "--out",
            str(out_dir),
            "--poll",
            "0.05",
            "--token",
            late,
        ]
    )
    assert code == 0, err
    assert "joined at round 2" in out and "done: 1 rounds" in out
    # round 2's aggregate holds only the late hospital's update (the deadline passed)
    local = flatten(torch.load(out_dir / "round-2" / "local.pt", weights_only=True))
    final = flatten(torch.load(out_dir / "round-2" / "global.pt", weights_only=True))
    np.testing.assert_allclose(final, local, atol=1e-6)
    assert not np.allclose(local, flatten(state))


def test_set_password_on_the_server(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", "a-brand-new-password")
    args = ["portal", "set-password", "--email", ADMIN, "--data-dir", str(tmp_path / "srv")]
    code, out, err = _run(args, monkeypatch, capsys)
    assert code == 0, err
    assert "password of admin@example.org changed" in out
    assert _token(ADMIN, "a-brand-new-password", monkeypatch, capsys).startswith("fcp_")
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", ADMIN_PW)
    code, _, err = _run(["portal", "token", "--email", ADMIN], monkeypatch, capsys)
    assert code == 2 and "wrong e-mail address or password" in err
    args[3] = "nobody@example.org"
    code, _, err = _run(args, monkeypatch, capsys)
    assert code == 2 and "no account" in err
    code, _, err = _run(
        ["portal", "set-password", "--email", ADMIN, "--data-dir", str(tmp_path / "none")],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "no portal database" in err


def test_admin_corrects_excludes_aggregates_and_cancels_by_cli(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    admin, _ = _plain_federation(
        "cli-admin",
        hospitals=("ha", "hb"),
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
        extra=("--dataset", "wdbc", "--local-epochs", "2", "--local-override", "lr"),
    )
    fed = PortalClient("http://testserver", token=admin, http=portal_app).federation("cli-admin")
    assert (fed.dataset, fed.local_epochs, fed.local_overrides) == ("wdbc", 2, ["lr"])
    code, out, err = run(["portal", "update", "cli-admin", "--local-epochs", "3", "--token", admin])
    assert code == 0 and "local_epochs" in out, err
    code, _, err = run(["portal", "update", "cli-admin", "--model", "mlpp", "--token", admin])
    assert code == 2 and "unknown model" in err and err.count("\n") == 1
    # a hospital uploads; the admin excludes it and the round cannot aggregate without it
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", HOSP_PW)
    ha = _token("ha@example.org", HOSP_PW, monkeypatch, capsys)
    update = tmp_path / "u.fcry"
    size = fed.model_size or 0
    from fedcrypt.protection.plain import PlainHospital

    update.write_bytes(PlainHospital().protect(np.ones(size), num_examples=3))
    hb = _token("hb@example.org", HOSP_PW, monkeypatch, capsys)
    code, out, err = run(["portal", "upload", "cli-admin", str(update), "--token", hb])
    assert code == 0, err  # round 1 (quorum 1) aggregates at once
    code, out, err = run(["portal", "upload", "cli-admin", str(update), "--token", ha])
    assert code == 0, err
    upload_id = PortalClient("http://testserver", token=admin, http=portal_app).uploads(fed.id, 2)
    code, out, err = run(
        ["portal", "exclude", "cli-admin", str(upload_id[0].id), "--reason", "test",
         "--token", admin]
    )  # fmt: skip
    assert code == 0 and "excluded upload" in out, err
    code, _, err = run(["portal", "aggregate", "cli-admin", "--token", admin])
    assert code == 2 and "quorum" in err
    code, out, err = run(["portal", "cancel", "cli-admin", "--reason", "done", "--token", admin])
    assert code == 0 and "cancelled" in out, err
    code, _, err = run(["portal", "upload", "cli-admin", str(update), "--token", hb])
    assert code == 2 and "cancelled" in err


def test_migrate_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcrypt.portal.migrate import head_revision

    data = tmp_path / "data"
    head = head_revision()
    code, out, err = _run(["portal", "migrate", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0 and f"upgraded from an empty database to {head}" in out, err
    code, out, _ = _run(["portal", "migrate", "--data-dir", str(data)], monkeypatch, capsys)
    assert code == 0 and f"already at {head}" in out
    code, _, err = _run(
        ["portal", "migrate", "--db", "mysql://x@localhost/y", "--data-dir", str(data)],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "unsupported database" in err and err.count("\n") == 1


# --- secagg ---------------------------------------------------------------------------


def _secagg_consortium(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *,
    hospitals: int = 3,
) -> tuple[str, list[str], Path, Path]:
    """Key files, approved hospitals and a 1-round secagg federation ``sa``.

    Returns the admin token, the hospitals' tokens, the keys folder and the initial model.
    """
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    keys = tmp_path / "keys"
    code, out, err = run(
        ["keys", "generate", "--protection", "secagg", "--hospitals", str(hospitals),
         "--out", str(keys)]
    )  # fmt: skip
    assert code == 0, err
    monkeypatch.setenv("FEDCRYPT_PORTAL_PASSWORD", HOSP_PW)
    for i in range(hospitals):
        run(["portal", "register", "--name", f"Site {i}", "--email", f"s{i}@example.org"])
    admin = _token(ADMIN, ADMIN_PW, monkeypatch, capsys)
    for i in range(hospitals):
        run(["portal", "approve", f"s{i}@example.org", "--token", admin])
    tokens = [_token(f"s{i}@example.org", HOSP_PW, monkeypatch, capsys) for i in range(hospitals)]
    initial = tmp_path / "initial.pt"
    run(["portal", "init-model", "-o", str(initial)])
    base = ["portal", "create-federation", "--name", "sa", "--initial-model", str(initial),
            "--protection", "secagg", "--quorum", str(hospitals), "--rounds", "1",
            "--token", admin]  # fmt: skip
    code, _, err = run(base)
    assert code == 2 and "--registry" in err and err.count("\n") == 1
    code, _, err = run([*base, "--registry", str(keys / "hospital-0.key")])
    assert code == 2 and "refusing a secret" in err, err
    code, _, err = run([*base, "--registry", str(keys / "registry.pub"), "--server-key", "x"])
    assert code == 2 and "--server-key is for he" in err
    code, out, err = run([*base, "--registry", str(keys / "registry.pub")])
    assert code == 0, err
    assert "secagg" in out and "--group-mask-key group-mask.key" in out
    return admin, tokens, keys, initial


def test_secagg_participate_refuses_missing_or_foreign_key_files(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    _, tokens, keys, _ = _secagg_consortium(tmp_path, monkeypatch, capsys)
    other = tmp_path / "other"
    run(["keys", "generate", "--protection", "secagg", "--hospitals", "3", "--out", str(other)])
    base = ["portal", "participate", "sa", "--out", str(tmp_path / "h0"), "--token", tokens[0]]
    mine = ["--key", str(keys / "hospital-0.key")]
    mask = ["--group-mask-key", str(keys / "group-mask.key")]
    cases = [
        ([], "pass --key"),
        (mine, "--group-mask-key"),
        (["--key", str(other / "hospital-0.key"), *mask], "was not generated with this registry"),
        ([*mine, "--group-mask-key", str(other / "group-mask.key")], "another consortium"),
        (
            [*mine, *mask, "--registry", str(other / "registry.pub")],
            "is not federation 'sa''s registry",
        ),
    ]
    for extra, message in cases:
        code, _, err = run([*base, *extra])
        assert code == 2 and message in err, (extra, err)
        assert err.count("\n") == 1


def test_secagg_participate_three_hospitals_in_process(
    portal_app: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``participate`` (the library loop) for three hospitals at once, one round."""
    import threading

    from fedcrypt.portal.participant import ParticipationConfig, participate
    from fedcrypt.portal.secagg import params_from_json

    _, tokens, keys, _ = _secagg_consortium(tmp_path, monkeypatch, capsys)
    results: dict[int, object] = {}

    def hospital(i: int) -> None:
        client = PortalClient("http://testserver", token=tokens[i], http=TestClient(portal_app.app))
        config = ParticipationConfig(
            client_id=i,
            num_clients=3,
            key_file=keys / f"hospital-{i}.key",
            group_mask_file=keys / "group-mask.key",
            poll_s=0.05,
            timeout_s=120,
        )
        try:
            results[i] = participate(
                client, "sa", config=config, rounds=1, out_dir=tmp_path / f"h{i}"
            )
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=hospital, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    outcomes = []
    for i in range(3):
        assert isinstance(results[i], list), results[i]
        (outcome,) = results[i]  # type: ignore[misc]
        assert outcome.contributed and outcome.protocol_round == 1
        outcomes.append(outcome)
    finals = [flatten(torch.load(o.global_model, weights_only=True)) for o in outcomes]
    locals_ = [flatten(torch.load(o.local_model, weights_only=True)) for o in outcomes]
    for f in finals[1:]:
        np.testing.assert_array_equal(f, finals[0])
    n = [o.num_examples for o in outcomes]
    fedavg = sum(w * v for w, v in zip(n, locals_, strict=True)) / sum(n)
    client = PortalClient("http://testserver", token=tokens[0], http=portal_app)
    params = params_from_json(client.federation("sa").secagg_params)
    assert np.max(np.abs(finals[0] - fedavg)) <= params.error_bound(3, sum(n)) + 1e-9
    assert (tmp_path / "h0" / "secagg-state-hospital-0").is_file()
    # status shows the session
    code, out, err = _run(["portal", "status", "sa", "--token", tokens[0]], monkeypatch, capsys)
    assert code == 0, err
    assert "done" in out and "dropped out: none" in out


@pytest.mark.parametrize("preset", ["packed", "fast"])
def test_decrypt_of_a_flipped_byte_fails_with_an_integrity_error(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One flipped byte anywhere in the ciphertext payload: decrypt exits 2 and says so."""
    run = lambda args: _run(args, monkeypatch, capsys)  # noqa: E731
    keys, init = tmp_path / "keys", tmp_path / "init.pt"
    assert run(["keys", "generate", "--out", str(keys), "--he-preset", preset])[0] == 0
    assert run(["portal", "init-model", "-o", str(init)])[0] == 0
    up = tmp_path / "up.fcry"
    bind = ["--key", str(keys / "hospital.key"), "--round", "1", "--run", "demo"]
    code, _, err = run(
        ["portal", "protect", str(init), "-o", str(up), "--num-examples", "10", *bind]
    )
    assert code == 0, err
    args = ["portal", "decrypt", "--like", str(init), "-o", str(tmp_path / "g.pt"), *bind]
    code, _, err = run([*args[:2], str(up), *args[2:]])
    assert code == 0, err  # the intact message decrypts
    data = bytearray(up.read_bytes())
    for where in (len(data) // 2, len(data) - 100):  # inside c0, inside the seeds
        bad = tmp_path / f"bad-{where}.fcry"
        flipped = bytearray(data)
        flipped[where] ^= 0x01
        bad.write_bytes(bytes(flipped))
        code, _, err = run([*args[:2], str(bad), *args[2:]])
        assert code == 2 and "integrity check failed (round 1)" in err, err
