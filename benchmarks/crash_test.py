"""Crash test at scale: SIGKILL the live engine at seeded moments while it trades scripted probabilities on
the paper exchange, restart it, and count after every restart's reconciliation the orphan orders,
unprotected positions and duplicated orders (all must be 0). Prints the counts as JSON.

    python benchmarks/crash_test.py --kills 100 --seed 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from live_support import crash_test, make_market  # noqa: E402  (path set up above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs (each followed by a restart)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--max-wait", type=float, default=6.0, help="longest trading time between kills (s)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        market = make_market(Path(tmp) / "market")
        counts = crash_test(market, Path(tmp) / "run", kills=args.kills, seed=args.seed, max_wait=args.max_wait,
                            progress=lambda c: print(json.dumps(c), flush=True))
    counts["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(counts))
    return 0 if counts["orphans"] == counts["unprotected"] == counts["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
