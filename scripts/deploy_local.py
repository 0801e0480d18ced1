"""Run fedcrypt on Flower's deployment engine on this machine (127.0.0.1, TLS, node auth).

Usage::

    python scripts/deploy_local.py [--rounds 1] [--clients 3] [--protection he] [--keep DIR]

Starts a SuperLink and one SuperNode per hospital in a temporary folder, runs the
``deploy/`` Flower App to the end, stops every process and prints the result. Exit
status 0 when the run completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

from fedcrypt.deploy import deploy_locally
from fedcrypt.exceptions import DeploymentError

APP_DIR = Path(__file__).resolve().parents[1] / "deploy"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the local deployment and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--protection", default="he", choices=["he", "plain", "secagg", "ckks"])
    parser.add_argument("--he-preset", default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default: 600)")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="work in this folder and keep it (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override (integer, float, true/false or text)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    extra: dict[str, str | int | float | bool] = {}
    for item in args.run_config:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--run-config expects KEY=VALUE, got {item!r}")
        extra[key.strip()] = _parse_value(value.strip())

    with tempfile.TemporaryDirectory(prefix="fedcrypt-deploy-") as tmp:
        work_dir = args.keep or Path(tmp)
        try:
            result = deploy_locally(
                app_dir=APP_DIR,
                work_dir=work_dir,
                clients=args.clients,
                rounds=args.rounds,
                protection=args.protection,
                he_preset=args.he_preset,
                run_config=extra,
                data_dir=args.data_dir,
                timeout=args.timeout,
            )
        except DeploymentError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"run {result.run_id}: {result.status} in {result.seconds:.1f} s ({work_dir})")
        for record in result.metrics.get("rounds", []):
            print(
                f"  round {record['round']}: auc {_fmt(record.get('auc'))}"
                f"  accuracy {_fmt(record.get('accuracy'))}"
                f"  up {record.get('bytes_up_per_client', 0) / 1e6:.2f} MB/hospital"
                f"  {record.get('seconds', 0):.1f} s"
            )
    return 0


def _parse_value(text: str) -> str | int | float | bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _fmt(value: object) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.3f}"
    return "n/a"


if __name__ == "__main__":
    sys.exit(main())
