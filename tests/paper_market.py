"""Small Bybit-schema market files (Trade CSV + Orderbook .data) with a scripted mid-price path, for the
paper-exchange tests: every price the tests assert on follows from the path given here."""
from __future__ import annotations

import json
from pathlib import Path

SYMBOL = "TESTUSDT"
START_MS = 1767225600000  # 2026-01-01 00:00:00 UTC
TICK = 0.01
LEVELS = 10


def _book(mid_ticks: int, half_spread: int, qty: float) -> tuple[dict[str, str], dict[str, str]]:
    bids = {f"{(mid_ticks - half_spread - k) * TICK:.2f}": f"{qty + k:.3f}" for k in range(LEVELS)}
    asks = {f"{(mid_ticks + half_spread + k) * TICK:.2f}": f"{qty + k:.3f}" for k in range(LEVELS)}
    return bids, asks


def write_market(root: Path, mids: list[float], trades: list[tuple[int, str, float, float]] | None = None,
                 qty: float = 1.0, half_spread: int = 1, instrument: dict | None = None, step_s: int = 1) -> Path:
    """One book every `step_s` seconds, the i-th at mid `mids[i]` (bids mid-1tick-k, asks mid+1tick+k, size
    qty+k), and the given trades (second offset, taker side, size, price); by default a 0.5 trade at the ask
    half a second after each book."""
    folder = root / f"{SYMBOL}_Sim"
    (folder / "Orderbook").mkdir(parents=True, exist_ok=True)
    (folder / "Trade").mkdir(parents=True, exist_ok=True)
    lines = []
    prev: tuple[dict[str, str], dict[str, str]] | None = None
    for i, mid in enumerate(mids):
        bids, asks = _book(round(mid / TICK), half_spread, qty)
        ts = START_MS + i * step_s * 1000
        if prev is None:
            data = {"s": SYMBOL, "b": [[p, q] for p, q in bids.items()], "a": [[p, q] for p, q in asks.items()]}
            kind = "snapshot"
        else:
            db = [[p, q] for p, q in bids.items() if prev[0].get(p) != q] + [[p, "0"] for p in prev[0] if p not in bids]
            da = [[p, q] for p, q in asks.items() if prev[1].get(p) != q] + [[p, "0"] for p in prev[1] if p not in asks]
            data = {"s": SYMBOL, "b": db, "a": da}
            kind = "delta"
        data.update(u=i + 1, seq=1000 + i)
        lines.append(json.dumps({"topic": f"orderbook.200.{SYMBOL}", "type": kind, "ts": ts, "data": data,
                                 "cts": ts - 1}))
        prev = (bids, asks)
    (folder / "Orderbook" / f"2026-01-01_{SYMBOL}_ob200.data").write_text("\n".join(lines) + "\n")
    if trades is None:
        trades = [(i * step_s, "Buy", 0.5, round(mid / TICK + half_spread) * TICK) for i, mid in enumerate(mids)]
    rows = ["timestamp,symbol,side,size,price,tickDirection,trdMatchID,grossValue,homeNotional,foreignNotional"]
    for n, (sec, side, size, price) in enumerate(trades):
        ts = START_MS / 1000 + sec + 0.5
        rows.append(f"{ts:.4f},{SYMBOL},{side},{size},{price:.2f},ZeroPlusTick,t-{n:06d},"
                    f"{int(size * price * 1e8)},{size},{size * price}")
    (folder / "Trade" / f"{SYMBOL}2026-01-01.csv").write_text("\n".join(rows) + "\n")
    inst = {"symbol": SYMBOL, "tickSize": TICK, "qtyStep": 0.001, "minOrderQty": 0.001, "minNotionalValue": 5}
    inst.update(instrument or {})
    (folder / "instrument.json").write_text(json.dumps(inst))
    return folder
