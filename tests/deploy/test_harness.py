"""The deploy/ Flower App and a real SuperLink + SuperNodes run of it on 127.0.0.1."""

from __future__ import annotations

import math
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcrypt.config import RunConfig
from fedcrypt.deploy import deploy_locally, make_node_key_pair, make_tls_files
from fedcrypt.deploy.flwr_cli import node_config

APP_DIR = Path(__file__).resolve().parents[2] / "deploy"
SERVER_ONLY_KEYS = {"server-key", "run-dir", "resume", "secagg-registry"}


def _app_config() -> dict[str, object]:
    with (APP_DIR / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_app_config_matches_run_config() -> None:
    config = _app_config()
    fields = {name.replace("_", "-") for name in RunConfig.model_fields}
    assert set(config) == fields | SERVER_ONLY_KEYS
    # The app's defaults are RunConfig's defaults.
    assert RunConfig.from_flower(config) == RunConfig()
    assert all(config[key] == "" for key in SERVER_ONLY_KEYS)


def test_app_builds_into_a_fab() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    with (APP_DIR / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)
    ok, errors, _ = validate_config(project, check_module=True, project_dir=APP_DIR)
    assert ok, errors
    assert build_fab_from_disk(APP_DIR)[:2] == b"PK"  # a zip


def test_tls_files(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for secret in (tls.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_node_key_pair_is_p384_openssh(tmp_path: Path) -> None:
    private, public = make_node_key_pair(tmp_path)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_node_config_parses_back(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    key = tmp_path / "a dir" / "hospital.key"
    text = node_config({"partition-id": 1, "num-partitions": 3, "hospital-key": str(key)})
    assert parse_config_args([text]) == {
        "partition-id": 1,
        "num-partitions": 3,
        "hospital-key": str(key),
    }


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment or command line mentions ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


@pytest.mark.deployment
@pytest.mark.timeout(600)
def test_one_he_round_on_the_deployment_engine(tmp_path: Path) -> None:
    pytest.importorskip("tenseal")
    work = tmp_path / "deployment"
    try:
        result = deploy_locally(
            app_dir=APP_DIR, work_dir=work, clients=3, rounds=1, protection="he", timeout=420
        )
    finally:
        if sys.platform.startswith("linux"):
            assert _processes_with(str(work)) == [], "processes left behind"

    assert result.status == "finished:completed"
    rounds = result.metrics["rounds"]
    assert len(rounds) == 1
    assert rounds[0]["clients"] == 3
    assert math.isfinite(rounds[0]["auc"]) and 0.0 <= rounds[0]["auc"] <= 1.0
    assert rounds[0]["bytes_up_per_client"] > 0
    assert result.metrics["info"]["scheme"] == "he"
    assert (result.hospital_dirs[0] / "model.pt").is_file()
    assert (result.run_dir / "metrics.json").is_file()

    # The secret CKKS key stayed with the hospitals.
    assert not list((work / "server").rglob("hospital.key"))
    assert "hospital.key" not in (work / "operator" / "run-config.toml").read_text()
    for hospital in work.glob("hospital-*"):
        assert stat.S_IMODE((hospital / "hospital.key").stat().st_mode) == 0o600


@pytest.mark.deployment
@pytest.mark.timeout(600)
def test_breastmnist_where_only_the_hospitals_hold_the_data(
    tmp_path: Path, shared_data: Path
) -> None:
    """The server needs no data: the hospitals build the model from the task's factory."""
    pytest.importorskip("tenseal")
    data = tmp_path / "hospital-data"
    data.mkdir()
    (data / "breastmnist.npz").symlink_to(shared_data / "breastmnist.npz")
    work = tmp_path / "deployment"
    result = deploy_locally(
        app_dir=APP_DIR,
        work_dir=work,
        clients=3,
        rounds=1,
        protection="he",
        run_config={"dataset": "breastmnist", "local-epochs": 1},
        data_dir=data,
        timeout=420,
    )
    assert result.status == "finished:completed"
    assert result.metrics["config"]["dataset"] == "breastmnist"
    assert result.metrics["config"]["model"] == "cnn"
    assert result.metrics["info"]["parameters"] > 10_000
    assert math.isfinite(result.metrics["rounds"][0]["auc"])
    # nothing of the data set reached the server's folder
    assert not list((work / "server").rglob("*.npz"))


@pytest.mark.deployment
@pytest.mark.timeout(900)
def test_one_secagg_round_on_the_deployment_engine(tmp_path: Path) -> None:
    """Five exchanges over TLS; the server holds only the public registry."""
    work = tmp_path / "deployment"
    result = deploy_locally(
        app_dir=APP_DIR, work_dir=work, clients=3, rounds=1, protection="secagg", timeout=800
    )
    assert result.status == "finished:completed"
    rnd = result.metrics["rounds"][0]
    assert rnd["clients"] == 3 and math.isfinite(rnd["auc"])
    assert result.metrics["info"]["scheme"] == "secagg"
    server_files = {p.name for p in (work / "server").rglob("*") if p.is_file()}
    assert "registry.pub" in server_files
    assert not server_files & {"identity.key", "group-mask.key"}
    for hospital in work.glob("hospital-*"):
        assert stat.S_IMODE((hospital / "identity.key").stat().st_mode) == 0o600
        assert (hospital / "secagg-state").is_file()  # progress persisted across runs
