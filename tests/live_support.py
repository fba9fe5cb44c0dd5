"""Shared pieces of the live-engine tests: a synthetic market, a paper exchange on 127.0.0.1, a model folder
or scripted probabilities, and the engine as a real child process (so signals, SIGKILL and exit codes are
the real thing)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from config import GlobalConfig, set_path

ROOT = Path(__file__).resolve().parents[1]
SYMBOL = "LIVEUSDT"
START = "2026-01-01T03:00"
START_MS = int(pd.Timestamp(START, tz="UTC").value // 1_000_000)
# 1-minute bars and short feature windows: warm after 135 bars, so 3 h of files warm the engine up.
TEST_SETS = {"data.timeframe": "1m", "features.macro_window": "2h", "features.day_window": "1h",
             "features.vwap_windows": "30m,1h", "features.z_window": "30m", "features.ema_spans": "10m,20m,40m",
             "features.atr_span": "10m", "features.rsi_span": "10m", "features.htf_span": "2",
             "features.ewm_tolerance": "0.05", "features.htf_timeframes": "5m,15m"}


def make_market(root: Path, days: int = 1) -> Path:
    """Simulated days (5 s book steps) of LIVEUSDT from 2026-01-01 in the collector's files."""
    from market_sim import simulate
    simulate(symbol=SYMBOL, days=days, seed=5, out=root, book_interval="5s")
    return root / f"{SYMBOL}_Sim"


def live_config(**sets: str) -> GlobalConfig:
    cfg = GlobalConfig()
    cfg.symbol = SYMBOL
    for key, value in {**TEST_SETS, **sets}.items():
        set_path(cfg, key, value)
    cfg.validate("test")
    return cfg


def write_model_dir(root: Path, edge: bool = True, **sets: str) -> Path:
    """A rank folder with params.json only (tests drive the engine with --probabilities)."""
    folder = root / "models_v9" / SYMBOL / "rank_1"
    folder.mkdir(parents=True, exist_ok=True)
    params = {"edge": edge, "verdict": "EDGE" if edge else "NO EDGE", "config": live_config(**sets).to_dict()}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def write_probabilities(path: Path, rows: dict[str, dict[str, float]]) -> Path:
    """bar_time (ISO) -> p_exec_long, p_exec_short, p_dir_long, p_dir_short (missing ones = 0)."""
    cols = ("p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short")
    lines = ["bar_time," + ",".join(cols)]
    for when, probs in rows.items():
        lines.append(when + "," + ",".join(str(probs.get(c, 0.0)) for c in cols))
    path.write_text("\n".join(lines) + "\n")
    return path


def exchange(folder: Path, start: str = START, **kw):
    """A per-message paper exchange over `folder` starting at `start`, clock driven by the engine."""
    from paper_exchange import ExchangeThread, build_exchange
    return ExchangeThread(build_exchange(folder, start=start, per_message=True, **kw))


def engine_cmd(url: str, model: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "live_trading_v2.py"), "--symbol", SYMBOL, "--paper", url, "--lockstep",
            "--model-dir", str(model), "--data-dir", str(data), *extra]


def spawn(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """The command as a child process whose output (stdout and stderr) goes to cwd/engine.out: a file, not a
    pipe, so a chatty engine never blocks on a full pipe while a test waits on its journals. A later spawn
    in the same folder appends; `output(proc)` reads only this child's part."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    path = cwd / "engine.out"
    start = path.stat().st_size if path.exists() else 0
    with open(path, "a") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.output_file = (path, start)  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    """What a spawned child has written so far."""
    path, start = proc.output_file  # type: ignore[attr-defined]
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read().decode(errors="replace")


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    proc = spawn(cmd, cwd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"engine did not finish in {timeout}s:\n{output(proc)[-4000:]}") from None
    return proc.returncode, output(proc)


def complete_lines(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file a child process is appending to ([] while it does not exist);
    a torn last line, caught mid-append, is left out rather than failing the parse."""
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines()]


def journal(cwd: Path, name: str, symbol: str = SYMBOL) -> list[dict]:
    return complete_lines(cwd / "logs" / f"{name}_{symbol}.jsonl")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition",
             proc: subprocess.Popen | None = None) -> None:
    """Poll until predicate() is true; on timeout fail naming `what`, with the tail of proc's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    tail = f"\n{SYMBOL} engine output (last 3000 characters):\n{output(proc)[-3000:]}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, str]:
    proc.send_signal(sig)
    proc.wait(timeout=timeout)
    return proc.returncode, output(proc)


# ---------------------------------------------------------------- crash test (tests and benchmarks/crash_test.py)
def busy_probabilities(path: Path, minutes: int = 240, start: str = START) -> Path:
    """A signal every bar after `start`: breakout longs on even minutes, maker shorts on odd ones."""
    rows = {}
    for m in range(1, minutes):
        when = (pd.Timestamp(start, tz="UTC") + pd.Timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows[when] = {"p_dir_long": 0.95} if m % 2 == 0 else {"p_exec_short": 0.99, "p_dir_short": 0.6}
    return write_probabilities(path, rows)


def audit(ex, cwd: Path) -> dict[str, int]:
    """After a restart's reconciliation: orphans (open exchange orders the engine neither owns nor knows;
    link-less stops on a flat leg), unprotected legs (size not covered by reduce-only stops) and duplicates
    (two entry orders for one intent: same side in the same bar)."""
    state = json.loads((cwd / "state" / f"bot_state_{SYMBOL}.json").read_text())
    known = set(state.get("links", {}))
    known |= {o["request"]["order_link_id"] for o in json.loads(state["execution"])["orders"]}
    orders = ex.call(lambda: list(ex.exchange.engine.orders.values()))
    sizes = ex.call(lambda: {i: abs(p.size) for i, p in ex.exchange.engine.positions.items()})
    orphans = unprotected = duplicates = 0
    for o in orders:
        if not o.is_open:
            continue
        if o.link_id and o.link_id not in known:
            orphans += 1
        elif not o.link_id and o.reduce_only and sizes.get(o.position_idx, 0) == 0:
            orphans += 1
    for idx, size in sizes.items():
        covered = sum(o.qty for o in orders if o.is_open and o.position_idx == idx and o.reduce_only
                      and "Stop" in o.stop_order_type)
        unprotected += int(size > 0 and covered < size)
    seen: dict[tuple, int] = {}
    for o in orders:
        if o.link_id and not o.reduce_only:
            key = (o.side, o.created // 60000)
            seen[key] = seen.get(key, 0) + 1
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    return {"orphans": orphans, "unprotected": unprotected, "duplicates": duplicates}


def settled_audit(ex, cwd: Path, grace: float = 5.0) -> dict[str, int]:
    """audit() once no leg is unprotected or `grace` wall seconds have passed after the restart's reconciliation
    (the issue's rule: a position must be covered by stops 5 s after a fill or a restart; the engine keeps
    stepping the lockstep clock meanwhile). Orphans and duplicates are counted on the same final look."""
    deadline = time.monotonic() + grace
    counts = audit(ex, cwd)
    while counts["unprotected"] and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = audit(ex, cwd)
    return counts


def reconciled_count(cwd: Path) -> int:
    return sum(1 for e in journal(cwd, "events") if e["event"] == "reconciled")


def crash_test(market: Path, cwd: Path, kills: int, seed: int, max_wait: float = 4.0,
               progress=None) -> dict[str, int]:
    """SIGKILL the trading engine at seeded moments and restart it `kills` times; audit after every
    restart's reconciliation (`progress(totals)` after each). Returns the summed counts plus kills, audits
    and fills."""
    import random
    rng = random.Random(seed)
    model = write_model_dir(cwd, **{"strategy.max_holding_bars": "3", "strategy.daily_loss_limit": "0.9"})
    probs = busy_probabilities(cwd / "p.csv")
    totals = {"orphans": 0, "unprotected": 0, "duplicates": 0, "kills": 0, "audits": 0}
    with exchange(market) as ex:
        cmd = engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--lockstep-step", "20s")
        for k in range(kills + 1):
            before = reconciled_count(cwd)
            proc = spawn(cmd, cwd)
            wait_for(lambda: reconciled_count(cwd) > before or proc.poll() is not None, 120, "reconciliation", proc)
            assert proc.poll() is None, output(proc)[-3000:]
            for key, value in settled_audit(ex, cwd).items():
                totals[key] += value
            totals["audits"] += 1
            if progress is not None:
                progress(totals)
            if k == kills:
                rc, out = stop(proc)
                assert rc == 0, out[-3000:]
                break
            time.sleep(rng.uniform(0.0, max_wait))
            proc.kill()
            proc.wait()
            totals["kills"] += 1
        totals["fills"] = ex.call(lambda: len(ex.exchange.engine.executions))
    return totals
