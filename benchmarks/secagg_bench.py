"""Benchmark ``secagg``: upload bytes and hospital seconds per round vs the issue-4 goals.

Runs full in-process rounds (:func:`fedcrypt.protection.secagg.run_round`) between N
hospitals and a server for a P-parameter update, prints a table and writes JSON. The
round has five stages; the cost of the consistency check (the active-server defence:
one signature per hospital, up to N signature checks per hospital before unmasking) is
reported on its own.

    python benchmarks/secagg_bench.py                       # 10 hospitals, 2.2 M values
    python benchmarks/secagg_bench.py --hospitals 5 --params 500000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcrypt.protection.plain import PlainAggregator, PlainHospital
from fedcrypt.protection.secagg import (
    STAGES,
    RoundConfig,
    SecAggParams,
    SecAggServer,
    new_consortium,
    run_round,
)

GOAL_UPLOAD_RATIO = 1.1
GOAL_PROTECT_SECONDS = 0.2


def plain_mean(inputs: dict[int, tuple[np.ndarray, int]], ids: list[int]) -> np.ndarray:
    blobs = [PlainHospital().protect(inputs[i][0], num_examples=inputs[i][1]) for i in ids]
    return PlainHospital().unprotect(PlainAggregator().aggregate(blobs)).mean


def bench(args: argparse.Namespace) -> dict[str, Any]:
    params = SecAggParams(neighbours=args.neighbours, group_mask=not args.no_group_mask)
    ids = list(range(args.hospitals))
    hospitals, registry = new_consortium(ids, params=params)
    gen = np.random.default_rng(args.seed)
    inputs = {
        i: (gen.normal(0.0, 0.05, args.params).astype(np.float32), int(gen.integers(40, 120)))
        for i in ids
    }
    drops = {"masked_input": set(ids[: args.dropouts])} if args.dropouts else {}
    rounds: list[dict[str, Any]] = []
    sizes: dict[tuple[str, str], list[int]] = {}

    def measure(stage: str, direction: str, hid: int, msg: bytes) -> bytes:
        sizes.setdefault((stage, direction), []).append(len(msg))
        return msg

    for r in range(1, args.rounds + 2):  # round 1 is a warm-up (allocations, imports)
        cfg = RoundConfig(round=r, hospital_ids=tuple(ids), vector_size=args.params, params=params)
        t0 = time.perf_counter()
        sizes.clear()
        server = SecAggServer(cfg, registry=registry)
        rep = run_round(server, hospitals, inputs, dropouts=drops, intercept=measure)
        wall = time.perf_counter() - t0
        if r == 1:
            continue
        present = [i for i in ids if i not in drops.get("masked_input", set())]
        protect = [rep.protect_seconds(i) for i in present]
        masked = [rep.hospital_seconds[i]["masked_input"] for i in present]
        assert rep.result is not None
        err = float(np.abs(rep.result.mean - plain_mean(inputs, present)).max())
        rounds.append(
            {
                "round": r,
                "wall_seconds": wall,
                "protect_seconds_median": statistics.median(protect),
                "protect_seconds_max": max(protect),
                "masked_input_seconds_median": statistics.median(masked),
                "unprotect_seconds": next(
                    v["unprotect"] for v in rep.hospital_seconds.values() if "unprotect" in v
                ),
                "server_seconds": sum(rep.server_seconds.values()),
                "server_seconds_by_stage": rep.server_seconds,
                "hospital_seconds_by_stage_median": {
                    s: statistics.median(rep.hospital_seconds[i][s] for i in present)
                    for s in STAGES
                },
                "consistency_seconds_median": statistics.median(
                    rep.hospital_seconds[i]["consistency"] for i in present
                ),
                "consistency_server_seconds": rep.server_seconds["consistency"],
                "bytes_by_stage_max": {
                    f"{stage}.{direction}": max(v) for (stage, direction), v in sizes.items()
                },
                "consistency_bytes_up": max(sizes[("consistency", "reply")]),
                "consistency_bytes_down": max(sizes[("consistency", "request")]),
                "unmask_request_bytes": max(sizes[("unmask", "request")]),
                "bytes_up_max": max(rep.bytes_up[i] for i in present),
                "bytes_masked_input": max(rep.masked_bytes.values()),
                "bytes_down_max": max(rep.bytes_down[i] for i in present),
                "max_abs_error_vs_plain": err,
                "error_bound": params.error_bound(len(present), rep.result.total_examples),
            }
        )
    float32_bytes = 4 * args.params
    scalar = [k for k, v in rounds[0].items() if isinstance(v, float) and k != "round"]
    med = {k: statistics.median(r[k] for r in rounds) for k in scalar}
    up_ratio = rounds[0]["bytes_up_max"] / float32_bytes
    return {
        "benchmark": "secagg",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "machine": platform.machine(),
        },
        "config": {
            "hospitals": args.hospitals,
            "params": args.params,
            "bits": params.bits,
            "scale": params.resolved_scale,
            "clip": params.clip,
            "neighbours": params.neighbours,
            "group_mask": params.group_mask,
            "dropouts_before_masking": args.dropouts,
            "rounds_measured": args.rounds,
        },
        "plaintext_float32_bytes": float32_bytes,
        "upload_bytes_per_hospital": rounds[0]["bytes_up_max"],
        "upload_ratio_vs_float32": up_ratio,
        "masked_input_ratio_vs_float32": rounds[0]["bytes_masked_input"] / float32_bytes,
        "download_bytes_per_hospital": rounds[0]["bytes_down_max"],
        "median_over_rounds": med,
        "goals": {
            "upload_ratio_max": GOAL_UPLOAD_RATIO,
            "upload_ok": up_ratio <= GOAL_UPLOAD_RATIO,
            "protect_seconds_max": GOAL_PROTECT_SECONDS,
            "protect_ok": med["protect_seconds_max"] <= GOAL_PROTECT_SECONDS,
        },
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", type=int, default=10)
    ap.add_argument("--params", type=int, default=2_200_000, help="values per update (P)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (after 1 warm-up)")
    ap.add_argument("--neighbours", type=int, default=None, help="SecAgg+ degree (default: all)")
    ap.add_argument("--no-group-mask", action="store_true")
    ap.add_argument("--dropouts", type=int, default=0, help="hospitals dropping before masking")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("secagg_bench.json"))
    args = ap.parse_args(argv)
    out = bench(args)
    med = out["median_over_rounds"]
    rows = [
        ("upload per hospital (bytes)", f"{out['upload_bytes_per_hospital']:,}", ""),
        ("plaintext float32 (bytes)", f"{out['plaintext_float32_bytes']:,}", ""),
        (
            "upload / float32",
            f"{out['upload_ratio_vs_float32']:.5f}",
            f"goal <= {GOAL_UPLOAD_RATIO}: {'OK' if out['goals']['upload_ok'] else 'MISSED'}",
        ),
        ("download per hospital (bytes)", f"{out['download_bytes_per_hospital']:,}", ""),
        ("hospital protect s (median hosp.)", f"{med['protect_seconds_median']:.3f}", ""),
        (
            "hospital protect s (slowest hosp.)",
            f"{med['protect_seconds_max']:.3f}",
            f"goal <= {GOAL_PROTECT_SECONDS}: {'OK' if out['goals']['protect_ok'] else 'MISSED'}",
        ),
        ("  of which masked input s", f"{med['masked_input_seconds_median']:.3f}", ""),
        (
            "  of which consistency check s",
            f"{med['consistency_seconds_median']:.4f}",
            "sign U3 (stage 3)",
        ),
        (
            "consistency stage bytes (down / up)",
            f"{out['rounds'][0]['consistency_bytes_down']:,} / "
            f"{out['rounds'][0]['consistency_bytes_up']:,}",
            "per hospital",
        ),
        (
            "unmask request bytes (U3 + signatures)",
            f"{out['rounds'][0]['unmask_request_bytes']:,}",
            "per hospital",
        ),
        ("hospital unprotect s", f"{med['unprotect_seconds']:.3f}", ""),
        ("server s (all stages)", f"{med['server_seconds']:.3f}", ""),
        (
            "  of which consistency stage s",
            f"{med['consistency_server_seconds']:.4f}",
            "verify N signatures",
        ),
        ("round wall s (in process)", f"{med['wall_seconds']:.3f}", ""),
        (
            "max |secagg - plain| / bound",
            f"{med['max_abs_error_vs_plain']:.2e} / {med['error_bound']:.2e}",
            "",
        ),
    ]
    cfg = out["config"]
    print(
        f"secagg: {cfg['hospitals']} hospitals, P = {cfg['params']:,}, {cfg['bits']}-bit, "
        f"group mask {'on' if cfg['group_mask'] else 'off'}, neighbours {cfg['neighbours']}, "
        f"dropouts {cfg['dropouts_before_masking']}; median of {cfg['rounds_measured']} rounds"
    )
    for name, value, note in rows:
        print(f"  {name:<36} {value:>22}  {note}")
    args.json.write_text(json.dumps(out, indent=2))
    print(f"  wrote {args.json}")
    return 0 if out["goals"]["upload_ok"] and out["goals"]["protect_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
