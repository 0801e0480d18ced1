"""A bounded load test: N hospitals upload at once to a served portal; memory and losses measured.

The portal runs as ``fedcrypt portal serve`` in a child process on 127.0.0.1 (SQLite, or
the PostgreSQL database given). N approved hospitals upload a ``plain`` update of the
same size at the same moment; the test then waits for the round to aggregate and checks
that every update is stored under its checksum and that the aggregate is the exact
FedAvg. The server's peak resident memory (``VmHWM`` from ``/proc/PID/status``, reset
before the uploads through ``/proc/PID/clear_refs``) is compared with the bytes
uploaded: uploads stream to disk and aggregation adds updates in bounded batches, so the
peak stays far below the total.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from fedcrypt.exceptions import ConfigError
from fedcrypt.portal.client import PortalClient, file_sha256
from fedcrypt.protection.plain import PlainHospital

ADMIN_EMAIL = "load-admin@example.org"
_PASSWORD = "load-test-password"  # noqa: S105 (a throwaway account on a loopback server)


@dataclass(frozen=True)
class LoadResult:
    """What one load test measured.

    Attributes
    ----------
    hospitals : int
        Hospitals that uploaded at the same time.
    update_bytes : int
        Size of each update in bytes.
    total_bytes : int
        ``hospitals * update_bytes``.
    upload_seconds : float
        Wall time from the start of the concurrent uploads until the last finished.
    throughput_mib_s : float
        ``total_bytes / upload_seconds`` in MiB/s.
    aggregation_wait_seconds : float
        From the last upload until the round was aggregated.
    server_rss_before_bytes : int
        Resident memory of the server process before the uploads.
    server_peak_rss_bytes : int
        Peak resident memory of the server during uploads and aggregation.
    peak_growth_bytes : int
        ``server_peak_rss_bytes - server_rss_before_bytes``.
    stored : int
        Updates the portal lists for the round with the uploaded checksum.
    lost : int
        ``hospitals - stored``.
    aggregated_updates : int
        Updates in the round's aggregate.
    aggregate_exact : bool
        Whether the aggregate decodes to the example-weighted mean, exact up to float32
        rounding (relative error at most 4 float32 epsilons).
    database : str
        ``sqlite`` or ``postgresql``.
    aggregate_batch_mb : int
        The server's aggregation batch (``--aggregate-batch-mb``).
    """

    hospitals: int
    update_bytes: int
    total_bytes: int
    upload_seconds: float
    throughput_mib_s: float
    aggregation_wait_seconds: float
    server_rss_before_bytes: int
    server_peak_rss_bytes: int
    peak_growth_bytes: int
    stored: int
    lost: int
    aggregated_updates: int
    aggregate_exact: bool
    database: str
    aggregate_batch_mb: int

    def summary(self) -> str:
        """Two lines for people."""
        mib = 1 << 20
        return (
            f"{self.hospitals} hospitals x {self.update_bytes / mib:.1f} MiB uploaded at once "
            f"({self.total_bytes / mib:.0f} MiB) in {self.upload_seconds:.2f} s = "
            f"{self.throughput_mib_s:.1f} MiB/s on {self.database}; stored {self.stored}, lost "
            f"{self.lost}; aggregate of {self.aggregated_updates} exact: {self.aggregate_exact}\n"
            f"server RSS {self.server_rss_before_bytes / mib:.0f} MiB before, peak "
            f"{self.server_peak_rss_bytes / mib:.0f} MiB (+{self.peak_growth_bytes / mib:.0f} "
            f"MiB = {self.peak_growth_bytes / self.total_bytes:.2f} x the bytes uploaded; "
            f"aggregation batches of {self.aggregate_batch_mb} MiB)"
        )


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ConfigError(f"/proc/{pid}/status has no {field} (the load test needs Linux)")


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):  # kernels without it: the peak covers the start too
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served_portal(
    data_dir: Path, *, db_url: str | None, aggregate_batch_mb: int
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``fedcrypt portal serve`` on a free loopback port; yields its URL and process."""
    port = _free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / "load-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCRYPT_PORTAL_")}
    env.update(
        FEDCRYPT_PORTAL_ADMIN_PASSWORD=_PASSWORD,
        FEDCRYPT_PORTAL_ADMIN_EMAIL=ADMIN_EMAIL,
    )
    cmd = [sys.executable, "-m", "fedcrypt.cli.main", "portal", "serve"]
    cmd += ["--data-dir", str(data_dir), "--port", str(port), "--tick", "0.5"]
    cmd += ["--aggregate-batch-mb", str(aggregate_batch_mb)]
    if db_url:
        cmd += ["--db", db_url]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 (our own CLI)
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise ConfigError(f"the portal exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError("the portal did not start within 90 s")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_load_test(
    work_dir: Path,
    *,
    hospitals: int = 20,
    values: int = 2_097_152,
    db_url: str | None = None,
    aggregate_batch_mb: int = 64,
    timeout_s: float = 600.0,
    on_event: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run the load test; see the module docstring.

    Parameters
    ----------
    work_dir : pathlib.Path
        Scratch folder (portal data, update files, server log).
    hospitals : int
        Hospitals uploading at the same time (default: 20).
    values : int
        Model values per update; a ``plain`` update takes ``8 * values`` bytes plus a
        small header (default: 2,097,152, i.e. 16 MiB).
    db_url : str, optional
        The portal's database (default: SQLite in ``work_dir``).
    aggregate_batch_mb : int
        The server's ``--aggregate-batch-mb`` (default: 64).
    timeout_s : float
        Longest wait for the uploads and for the aggregate (default: 600).
    on_event : callable, optional
        Receives one line of progress per step.

    Raises
    ------
    fedcrypt.exceptions.ConfigError
        If the portal does not start or the round does not aggregate in time.
    """
    say = on_event or (lambda _msg: None)
    if not 1 <= hospitals <= 1000:
        raise ConfigError(f"hospitals must be in 1..1000, got {hospitals}")
    if not 1 <= values <= 1 << 28:
        raise ConfigError(f"values must be in 1..{1 << 28}, got {values}")
    work_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    counts = [10 + i for i in range(hospitals)]
    for i, n in enumerate(counts):
        path = work_dir / f"update-{i}.fcry"
        path.write_bytes(PlainHospital().protect(np.full(values, float(i + 1)), num_examples=n))
        files.append(path)
    update_bytes = files[0].stat().st_size
    say(f"wrote {hospitals} updates of {update_bytes / (1 << 20):.1f} MiB")
    with served_portal(
        work_dir / "portal-data", db_url=db_url, aggregate_batch_mb=aggregate_batch_mb
    ) as (url, proc):
        with PortalClient(url) as admin:
            admin.issue_token(email=ADMIN_EMAIL, password=_PASSWORD)
            tokens = []
            for i in range(hospitals):
                email = f"load-h{i}@example.org"
                with PortalClient(url) as h:
                    user = h.register(name=f"Load hospital {i}", email=email, password=_PASSWORD)
                    admin.decide(user.id, "approve")
                    tokens.append(h.issue_token(email=email, password=_PASSWORD).token)
            fed = admin.create_federation(
                name="load test",
                protection="plain",
                quorum=hospitals,
                num_rounds=1,
                round_deadline_minutes=60,
                model_size=values,
            )
            init = work_dir / "initial.bin"
            init.write_bytes(b"opaque initial model")
            admin.put_initial_model(fed.id, init, model_size=values)
        say(f"{hospitals} hospitals approved; uploading at once")
        time.sleep(1.0)  # let the server settle before measuring
        rss_before = _status_kib(proc.pid, "VmRSS") * 1024
        _reset_peak(proc.pid)
        barrier = threading.Barrier(hospitals)

        def upload(i: int) -> str:
            with PortalClient(url, token=tokens[i], timeout=timeout_s) as client:
                barrier.wait(timeout=60)
                return client.upload_update(fed.id, 1, files[i]).sha256

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=hospitals) as pool:
            shas = list(pool.map(upload, range(hospitals)))
        upload_s = time.perf_counter() - t0
        say(f"uploads done in {upload_s:.2f} s; waiting for the aggregate")
        t1 = time.perf_counter()
        with PortalClient(url, token=tokens[0], timeout=timeout_s) as client:
            client.wait_for_aggregate(fed.id, 1, poll_s=0.2, timeout_s=timeout_s)
            wait_s = time.perf_counter() - t1
            peak = _status_kib(proc.pid, "VmHWM") * 1024
            listed = {u.hospital_id: u.sha256 for u in client.uploads(fed.id, 1)}
            agg_path = work_dir / "aggregate.fcry"
            client.download_aggregate(fed.id, 1, agg_path)
    expected = {file_sha256(p) for p in files}
    stored = len(set(listed.values()) & expected & set(shas))
    result = PlainHospital().unprotect(agg_path.read_bytes())
    want = sum(n * (i + 1) for i, n in enumerate(counts)) / sum(counts)
    exact = bool(
        result.num_updates == hospitals
        and result.total_examples == sum(counts)
        # plain updates are float32 (as Flower sends): the mean is exact up to its rounding
        and np.allclose(result.mean, want, rtol=4 * float(np.finfo(np.float32).eps), atol=0)
    )
    total = update_bytes * hospitals
    return LoadResult(
        hospitals=hospitals,
        update_bytes=update_bytes,
        total_bytes=total,
        upload_seconds=upload_s,
        throughput_mib_s=total / (1 << 20) / upload_s,
        aggregation_wait_seconds=wait_s,
        server_rss_before_bytes=rss_before,
        server_peak_rss_bytes=peak,
        peak_growth_bytes=max(0, peak - rss_before),
        stored=stored,
        lost=hospitals - stored,
        aggregated_updates=result.num_updates,
        aggregate_exact=exact,
        database="postgresql" if db_url and db_url.startswith("postgres") else "sqlite",
        aggregate_batch_mb=aggregate_batch_mb,
    )


def write_result(result: LoadResult, path: Path) -> None:
    """Write the figures as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
