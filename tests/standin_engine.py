"""A stand-in for live_trading_v2.py that the watchdog tests drive: heartbeat, exit codes, hangs.

    python tests/standin_engine.py --symbol SYM --runs hang,exit:0 --events ev.jsonl [--on-term ignore]

Each start takes the next behaviour of `--runs` (the last one repeats; a counter file in the state
folder remembers the run number):
- `exit:N`   write `--beats` heartbeats, then exit with code N;
- `signal:N` write `--beats` heartbeats, then kill itself with signal N (a crash the OS reports as -N);
- `run`      write heartbeats until stopped;
- `hang`     write `--beats` heartbeats, then stop writing them and sleep (a hung main loop);
- `flatten:S` phase `flattening`, heartbeats until S seconds after the first SIGTERM, then exit 0 by itself;
- `flatten-hang` phase `flattening`, `--beats` heartbeats, then hang.
SIGTERM (and SIGBREAK) either exits 0 (`--on-term exit`) or is ignored (`--on-term ignore`).
Every start, heartbeat, signal and exit is appended to `--events` as a JSON line with the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def record(path: Path, event: str, **extra: object) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **extra}) + "\n")


def beat(path: Path, phase: str, open_positions: int) -> None:
    """Rewrite the heartbeat atomically, in the fields of DESIGN.md §3."""
    now = time.time()
    body = {"ts": int(now * 1000), "pid": os.getpid(), "phase": phase, "open_positions": open_positions,
            "last_stop_check": int(now * 1000), "model": "standin"}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body), encoding="utf-8")
    os.replace(tmp, path)


def next_behaviour(state: Path, symbol: str, runs: list[str]) -> tuple[int, str]:
    counter = state / f"standin_runs_{symbol}"
    run = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(run + 1))
    return run, runs[min(run, len(runs) - 1)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--symbol", required=True)
    p.add_argument("--state-dir", default="state")
    p.add_argument("--runs", required=True, help="comma-separated behaviours, one per start")
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--beats", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--on-term", choices=("exit", "ignore"), default="exit")
    p.add_argument("--open-positions", type=int, default=1)
    a = p.parse_args()
    state = Path(a.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    heartbeat = state / f"heartbeat_{a.symbol}.json"
    run, behaviour = next_behaviour(state, a.symbol, a.runs.split(","))
    kind, _, arg = behaviour.partition(":")

    termed: list[float] = []

    def on_term(signum: int, _frame: object) -> None:
        termed.append(time.monotonic())
        if a.on_term == "ignore":
            record(a.events, "term-ignored", run=run)
            return
        record(a.events, "term", run=run)
        beat(heartbeat, "stopping", a.open_positions)
        sys.exit(0)

    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_term)
    record(a.events, "start", run=run, behaviour=behaviour)
    phase = "flattening" if kind.startswith("flatten") else "trading"
    n = 0
    while kind in ("run", "flatten") or n < a.beats:
        if kind == "flatten" and termed and time.monotonic() >= termed[0] + float(arg):
            break
        beat(heartbeat, phase, a.open_positions)
        record(a.events, "beat", run=run, phase=phase)
        n += 1
        time.sleep(a.interval)
    if kind in ("hang", "flatten-hang"):
        while True:
            time.sleep(3600)
    if kind == "signal":
        record(a.events, "signal", run=run, signal=int(arg))
        os.kill(os.getpid(), int(arg))
    code = int(arg) if kind == "exit" else 0
    record(a.events, "exit", run=run, code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
