"""data_collector.py against local servers on 127.0.0.1: real Binance USD-M recordings replayed frame by frame
through tests/fake_binance.py, a local Bybit stream, and a local HTTP archive for the downloader.

The collector runs as the real CLI subprocess where signals matter (SIGINT, SIGKILL) and as the same
Recorder in a thread elsewhere (no interpreter start-up per test); the files it writes are read back with
data_loader (BookReplay, iter_trades) and compared with the recording's bookTicker ground truth and trade ids.
"""
from __future__ import annotations

import asyncio
import gzip
import http.server
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from websockets.asyncio.server import serve

import data_collector as dc
from data_loader import BookReplay, iter_trades, list_files
from fake_binance import FakeBinance, Recording, load_recording

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def recording(realdata: Path) -> Recording:
    """Both symbols from 2024-07-18 23:57:01 to 07-19 00:01:00 (across midnight), in receive-time order."""
    return load_recording(sorted((realdata / "binance_usdm").glob("usdm_*usdt_2024071*.gz")),
                          until_ns=1_721_347_260 * 10**9)


def head(rec: Recording, n: int) -> Recording:
    """The first n frames of a recording (same snapshots and tickers)."""
    frames = rec.frames[:n]
    ids: dict[str, list[int]] = {}
    for fr in frames:
        if fr.route == "market":
            ids.setdefault(fr.symbol, []).append(int(fr.payload["a"]))
    return Recording(frames, rec.snapshots, rec.tickers, ids)


def start_collector(srv: FakeBinance, out: Path, *extra: str) -> subprocess.Popen:
    """The CLI as users run it, pointed at the fake server."""
    log_file = out / "collector.log"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "data_collector.py"), *SYMBOLS, "--ws-url", srv.ws_url,
           "--rest-url", srv.rest_url, "--out", str(out), "--flush-interval", "0.2", "--status-interval", "1",
           "--backoff-base", "0.05", "--log-file", str(log_file), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class InProcessCollector:
    """The same Recorder the CLI runs, in a thread of the test process (no interpreter start-up cost)."""

    def __init__(self, settings: dc.CollectorSettings):
        self.settings = settings
        self.recorder: dc.Recorder | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.started = threading.Event()
        self.thread.start()
        assert self.started.wait(30)

    def _main(self) -> None:
        async def run() -> None:
            self.loop, self.recorder = asyncio.get_running_loop(), dc.Recorder(self.settings)
            self.started.set()
            await self.recorder.run()
        try:
            asyncio.run(run())
        except BaseException as exc:     # surfaced by poll()/stop() in the test thread
            self.error = exc
            self.started.set()

    def poll(self) -> int | None:
        """Like Popen.poll: None while recording."""
        return None if self.thread.is_alive() else (1 if self.error else 0)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def send_signal(self, _sig: int) -> None:
        self.loop.call_soon_threadsafe(self.recorder.stop.set)

    def wait(self, timeout: float) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "recorder did not stop"
        if self.error:
            raise self.error
        return 0


def in_process(srv: FakeBinance, out: Path) -> InProcessCollector:
    return InProcessCollector(dc.CollectorSettings(
        symbols=list(SYMBOLS), out=out, ws_url=srv.ws_url, rest_url=srv.rest_url, flush_interval=0.2,
        status_interval=1.0, backoff_base=0.05))


def newest(folder: Path) -> Path | None:
    files = sorted(p for p in folder.glob("*") if p.suffix in (".csv", ".data"))
    return files[-1] if files else None


def tail(path: Path | None, size: int = 1 << 16) -> bytes:
    if path is None or not path.exists():
        return b""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read()


def wait_caught_up(out: Path, srv: FakeBinance, proc: subprocess.Popen | InProcessCollector,
                   timeout: float = 150) -> None:
    """Wait until the replay ended and each symbol's last trade and last sent diff are on disk."""
    assert srv.finished.wait(timeout), "fake server did not finish its replay"
    last: dict[str, tuple[int, int]] = {}
    for i, fr in enumerate(srv.rec.frames):
        if fr.route == "market":
            last[fr.symbol] = (int(fr.payload["a"]), last.get(fr.symbol, (0, 0))[1])
        elif i not in srv.drop:
            last[fr.symbol] = (last.get(fr.symbol, (0, 0))[0], int(fr.payload["u"]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"collector exited early with {proc.returncode}"
        if all(f",{a},".encode() in tail(newest(out / f"{s}_Binance" / "Trade"))
               and f'"u":{u},'.encode() in tail(newest(out / f"{s}_Binance" / "Orderbook"))
               for s, (a, u) in last.items()):
            return
        time.sleep(0.2)
    raise AssertionError("collector did not write the whole replay in time")


def stop(proc: subprocess.Popen | InProcessCollector) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(30)


def sidecar_totals(out: Path, symbol: str, venue: str = "Binance") -> dict[str, int]:
    """Counters summed over every day's integrity file."""
    totals: dict[str, int] = {}
    for path in sorted((out / f"{symbol}_{venue}" / "integrity").glob("*.json")):
        for k, v in json.loads(path.read_text()).items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    return totals


def rebuild_vs_ticker(folder: Path, tickers: dict[int, tuple[float, float, float, float]]) -> tuple[int, int, object]:
    """Rebuild the book with data_loader; (comparable events, mismatches, load report).

    Comparable = a bookTicker whose update id equals the final u of a message the loader applied."""
    files = list_files(folder)
    rows: list[np.ndarray] = []
    report = BookReplay(files.symbol, 0, 50, tob_rows=1 << 14).run(files.books, on_tob=rows.append)
    tob = np.concatenate(rows)
    compared = mismatched = 0
    for _, u, bid, bsz, ask, asz in tob:
        truth = tickers.get(int(u))
        if truth is not None:
            compared += 1
            mismatched += (bid, bsz, ask, asz) != truth
    return compared, mismatched, report


def trade_ids(folder: Path) -> list[int]:
    return [int(x) for chunk in iter_trades(folder) for x in chunk["trdMatchID"]]


def book_lines(folder: Path) -> list[dict]:
    return [orjson.loads(line) for p in list_files(folder).books
            for line in (gzip.open(p) if p.suffix == ".gz" else open(p, "rb"))]


def record_replay(srv: FakeBinance, out: Path) -> None:
    """Record the server's whole replay in-process, stop cleanly, and always stop the server."""
    try:
        proc = in_process(srv, out)
        wait_caught_up(out, srv, proc)
        assert stop(proc) == 0
    finally:
        srv.stop()


# ------------------------------------------------------------------------------- Binance recorder
def test_replay_rebuilds_exchange_book_and_records_every_trade_once(recording: Recording, tmp_path: Path) -> None:
    """Two-symbol replay across midnight: the rebuilt book matches bookTicker at 100% of comparable events."""
    srv = FakeBinance(recording).start()
    try:
        proc = start_collector(srv, tmp_path, "--gzip")
        wait_caught_up(tmp_path, srv, proc)
        assert stop(proc) == 0
    finally:
        srv.stop()
    for sym in SYMBOLS:
        folder = tmp_path / f"{sym}_Binance"
        # layout: the closed day is gzipped, the open day is plain; every book file starts with a snapshot
        assert sorted(p.name for p in (folder / "Orderbook").iterdir()) == [
            f"2024-07-18_{sym}_ob1000.data.gz", f"2024-07-19_{sym}_ob1000.data"]
        assert sorted(p.name for p in (folder / "Trade").iterdir()) == [f"{sym}2024-07-18.csv.gz", f"{sym}2024-07-19.csv"]
        for path in list_files(folder).books:
            with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
                assert orjson.loads(fh.readline())["type"] == "snapshot"
        compared, mismatched, report = rebuild_vs_ticker(folder, recording.tickers[sym])
        assert compared > 100 and mismatched == 0, f"{sym}: {mismatched} of {compared} ticker events differ"
        assert report.bad_book_lines == 0 and report.book["gaps"] == 0 and report.book["crossed"] == 0
        assert report.book["time_reversals"] == 0
        ids = trade_ids(folder)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(recording.trade_ids[sym])
        side = sidecar_totals(tmp_path, sym)
        assert (side["gaps"], side["resyncs"], side["snapshots"], side["reconnects"], side["dropped"]) == (0, 0, 1, 0, 0)
        assert side["trade_messages"] == len(ids) and side["sessions"] == 2     # two days, one session each
    # trade rows follow Bybit's archive columns; the taker side comes from the maker flag
    first = next(fr.payload for fr in recording.frames if fr.route == "market" and fr.symbol == "BTCUSDT")
    csv = pd.read_csv(tmp_path / "BTCUSDT_Binance" / "Trade" / "BTCUSDT2024-07-18.csv.gz", dtype={"trdMatchID": str})
    row = csv[csv.trdMatchID == str(first["a"])].iloc[0]
    assert row.timestamp == first["T"] / 1000 and row.side == ("Sell" if first["m"] else "Buy")
    assert row.foreignNotional == pytest.approx(float(first["p"]) * float(first["q"]))
    assert list(csv.columns)[-1] == "RPI"
    assert "status frames=" in (tmp_path / "collector.log").read_text()
    assert "stopped cleanly" in (tmp_path / "collector.log").read_text()


def test_dropped_diff_is_detected_and_resynced(recording: Recording, tmp_path: Path) -> None:
    """One lost depth diff: gap detected, new REST snapshot, one resync counted, files still load exactly."""
    rec = head(recording, 4000)
    btc_diffs = [i for i, fr in enumerate(rec.frames) if fr.route == "public" and fr.symbol == "BTCUSDT"]
    dropped = btc_diffs[len(btc_diffs) // 2]
    srv = FakeBinance(rec, drop={dropped}, pace_every=10, pace_sleep=0.01).start()
    record_replay(srv, tmp_path)
    btc, eth = sidecar_totals(tmp_path, "BTCUSDT"), sidecar_totals(tmp_path, "ETHUSDT")
    assert (btc["gaps"], btc["resyncs"], btc["snapshots"]) == (1, 1, 2)
    assert (eth["gaps"], eth["resyncs"], eth["snapshots"]) == (0, 0, 1)
    assert srv.snapshot_requests["BTCUSDT"] >= 2
    lines = book_lines(tmp_path / "BTCUSDT_Binance")
    assert [m["type"] for m in lines].count("snapshot") == 2
    assert int(rec.frames[dropped].payload["u"]) not in {m["data"]["u"] for m in lines}
    compared, mismatched, report = rebuild_vs_ticker(tmp_path / "BTCUSDT_Binance", rec.tickers["BTCUSDT"])
    assert compared >= 10 and mismatched == 0 and report.bad_book_lines == 0
    assert report.book["gaps"] == 0       # the file itself is gap-free: the resync snapshot restarts the chain


def test_server_close_reconnects_and_resyncs(recording: Recording, tmp_path: Path) -> None:
    """The server drops both routes with an outage: the collector reconnects, takes a fresh snapshot and
    backfills the trades it missed over REST, so every trade is still recorded exactly once."""
    rec = head(recording, 4000)
    srv = FakeBinance(rec, close_after={2000: "public", 3000: "market"}, outage_frames=100, pace_every=10,
                      pace_sleep=0.01).start()
    record_replay(srv, tmp_path)
    assert srv.connections == {"public": 2, "market": 2}
    assert all(p.split("?")[0] in ("/public/stream", "/market/stream") for p in srv.paths)
    lost_trades = [rec.frames[i] for i in srv.lost if rec.frames[i].route == "market"]
    for sym in SYMBOLS:
        side = sidecar_totals(tmp_path, sym)
        assert (side["reconnects"], side["resyncs"], side["snapshots"], side["gaps"]) == (2, 1, 2, 0)
        missed = sum(fr.symbol == sym for fr in lost_trades)
        assert missed > 0 and side["trade_gaps"] == side["backfilled_trades"] == missed
        for path in sorted((tmp_path / f"{sym}_Binance" / "Trade").iterdir()):   # held trades keep id order
            assert pd.read_csv(path)["trdMatchID"].is_monotonic_increasing
        ids = trade_ids(tmp_path / f"{sym}_Binance")
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(rec.trade_ids[sym])
        compared, mismatched, report = rebuild_vs_ticker(tmp_path / f"{sym}_Binance", rec.tickers[sym])
        assert compared >= 10 and mismatched == 0 and report.bad_book_lines == 0


def test_proactive_reconnect_before_the_connection_age_limit(recording: Recording, tmp_path: Path) -> None:
    """Connections older than max_connection_age are replaced at once (Binance cuts at 24 h); each new
    depth connection resyncs from a fresh snapshot and trades lost in flight are backfilled. Only trades
    in flight at the very end can stay missing: no later trade reveals the hole."""
    rec = head(recording, 3000)
    # paced to last ~6 s, so each connection passes the 1.5 s age limit several times and the resyncs of
    # the middle connections complete before the replay ends, however fast the machine
    srv = FakeBinance(rec, pace_every=10, pace_sleep=0.02).start()
    try:
        proc = InProcessCollector(dc.CollectorSettings(
            symbols=list(SYMBOLS), out=tmp_path, ws_url=srv.ws_url, rest_url=srv.rest_url, flush_interval=0.2,
            max_connection_age=1.5, backoff_base=0.05))
        assert srv.finished.wait(120)
        time.sleep(1.5)
        assert stop(proc) == 0
    finally:
        srv.stop()
    assert srv.connections["public"] >= 3 and srv.connections["market"] >= 3
    for sym in SYMBOLS:
        side = sidecar_totals(tmp_path, sym)
        assert side["reconnects"] >= 4 and side["resyncs"] >= 2 and side["gaps"] == 0
        assert side["trade_gaps"] == side["backfilled_trades"]
        ids = sorted(trade_ids(tmp_path / f"{sym}_Binance"))
        expected = sorted(rec.trade_ids[sym])
        assert len(ids) == len(set(ids)) and ids == expected[:len(ids)] and len(ids) >= len(expected) - 20
        compared, mismatched, report = rebuild_vs_ticker(tmp_path / f"{sym}_Binance", rec.tickers[sym])
        assert compared >= 10 and mismatched == 0 and report.bad_book_lines == 0 and report.book["gaps"] == 0


def test_duration_stops_cleanly_on_its_own(recording: Recording, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """--duration ends the session by itself: files flushed and closed, sidecars written."""
    caplog.set_level(logging.INFO, logger="data_collector")
    srv = FakeBinance(head(recording, 3000), pace_every=5, pace_sleep=0.05).start()
    try:
        t0 = time.monotonic()
        proc = InProcessCollector(dc.CollectorSettings(
            symbols=list(SYMBOLS), out=tmp_path, ws_url=srv.ws_url, rest_url=srv.rest_url, duration=2.0))
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    assert 2.0 <= elapsed < 20 and not srv.finished.is_set()
    assert "duration reached" in caplog.text and "stopped cleanly" in caplog.text
    for sym in SYMBOLS:
        side = sidecar_totals(tmp_path, sym)
        lines = book_lines(tmp_path / f"{sym}_Binance")
        assert side["snapshots"] == 1 and lines[0]["type"] == "snapshot"
        assert len(lines) == side["applied"] + side["snapshots"]      # everything applied reached the disk


def test_sigkill_keeps_written_lines_and_restart_isolates_a_torn_line(recording: Recording, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL mid-run: every line on disk loads. A torn last line (what power loss leaves; SIGKILL cannot
    tear a line because each line is one write) is counted by the loader and, after a restart appends to
    the same day, stays a single bad line instead of corrupting the next record."""
    rec = head(recording, 4000)
    srv = FakeBinance(rec, pace_every=10, pace_sleep=0.01).start()
    book = tmp_path / "BTCUSDT_Binance" / "Orderbook" / "2024-07-18_BTCUSDT_ob1000.data"
    try:
        proc = start_collector(srv, tmp_path)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not book.exists() or book.read_bytes().count(b"\n") < 300):
            time.sleep(0.1)
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        srv.stop()
    folder = tmp_path / "BTCUSDT_Binance"
    written = book.read_bytes()
    complete = written.count(b"\n")
    last_u = max(int(fr.payload["u"]) for fr in rec.frames if fr.route == "public" and fr.symbol == "BTCUSDT")
    assert complete >= 300 and f'"u":{last_u},'.encode() not in written, "the kill did not land mid-run"
    _, mismatched, report = rebuild_vs_ticker(folder, rec.tickers["BTCUSDT"])
    assert report.bad_book_lines == 0 and mismatched == 0
    assert report.book["messages"] == complete
    last = written.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    with open(book, "ab") as fh:            # the torn tail of an interrupted write
        fh.write(last[: len(last) // 2])
    _, _, report = rebuild_vs_ticker(folder, rec.tickers["BTCUSDT"])
    assert report.bad_book_lines == 1 and report.book["messages"] == complete

    srv = FakeBinance(head(recording, 800)).start()
    record_replay(srv, tmp_path)
    _, _, report = rebuild_vs_ticker(folder, rec.tickers["BTCUSDT"])
    assert report.bad_book_lines == 1
    lines = book.read_bytes().split(b"\n")
    assert lines[complete] == last[: len(last) // 2]
    assert orjson.loads(lines[complete + 1])["type"] == "snapshot"
    assert "last line is incomplete" in caplog.text


# --------------------------------------------------------------------------------- Bybit recorder
def _bybit_frames(realdata: Path, symbol: str) -> list[dict]:
    """Recorded linear orderbook.200 and publicTrade frames of one symbol, in order."""
    out = []
    with gzip.open(realdata / "bybit" / "cryptofeed_BYBIT_v5_ws_2026-08-09.jsonl.gz") as fh:
        for line in fh:
            rec = orjson.loads(line)
            if rec.get("t") != "recv" or symbol not in rec.get("data", ""):
                continue
            msg = orjson.loads(rec["data"])
            if msg.get("topic") in (f"orderbook.200.{symbol}", f"publicTrade.{symbol}"):
                out.append(msg)
    return out


def test_bybit_recorder_writes_contract_files_and_resubscribes_on_gap(realdata: Path, tmp_path: Path) -> None:
    """A local Bybit stream replays a real session with one delta missing: the recorder resubscribes, the
    resync snapshot restarts a gap-free file, and every trade is written with the venue's tick direction."""
    frames = _bybit_frames(realdata, "SOLUSDT")
    deltas = [i for i, m in enumerate(frames) if m.get("type") == "delta" and m["topic"].startswith("orderbook")]
    skip = deltas[len(deltas) // 2]
    requests: asyncio.Queue = asyncio.Queue()
    subscribes: list[list[str]] = []
    expected_u: list[int] = []          # the u of every book line the recorder should write, in order
    done = asyncio.Event()

    async def handler(ws) -> None:
        async def reader() -> None:
            async for raw in ws:
                msg = orjson.loads(raw)
                if msg.get("op") == "subscribe":
                    subscribes.append(msg["args"])
                    await requests.put(msg)
        task = asyncio.create_task(reader())
        await requests.get()
        await ws.send(orjson.dumps({"success": True, "op": "subscribe", "conn_id": "t"}).decode())
        book: dict[str, dict[str, str]] = {"b": {}, "a": {}}
        state = {"u": 0, "seq": 0, "ts": 0, "cts": 0, "in_gap": False}

        async def resync_if_asked() -> None:
            while not requests.empty():
                await requests.get()
                snap = {"topic": "orderbook.200.SOLUSDT", "type": "snapshot", "ts": state["ts"],
                        "data": {"s": "SOLUSDT", "b": sorted(book["b"].items(), key=lambda x: -float(x[0])),
                                 "a": sorted(book["a"].items(), key=lambda x: float(x[0])), "u": state["u"],
                                 "seq": state["seq"]}, "cts": state["cts"]}
                await ws.send(orjson.dumps(snap).decode())
                expected_u.append(state["u"])
                state["in_gap"] = False

        for i, msg in enumerate(frames):
            await resync_if_asked()
            if msg["topic"].startswith("orderbook"):
                data = msg["data"]
                for side in ("b", "a"):
                    if msg["type"] == "snapshot":
                        book[side] = {}
                    for p, q in data[side]:
                        if float(q) == 0:
                            book[side].pop(p, None)
                        else:
                            book[side][p] = q
                state.update(u=data["u"], seq=data["seq"], ts=msg["ts"], cts=msg["cts"])
                if i == skip:
                    state["in_gap"] = True
                elif not state["in_gap"]:
                    expected_u.append(data["u"])
            if i != skip:
                await ws.send(orjson.dumps(msg).decode())
            await asyncio.sleep(0.002)
        for _ in range(6000):
            if not state["in_gap"]:
                break
            await asyncio.sleep(0.01)
            await resync_if_asked()
        done.set()
        await ws.wait_closed()
        task.cancel()

    async def main() -> int:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            proc = InProcessCollector(dc.CollectorSettings(
                symbols=["SOLUSDT"], exchange="bybit", ws_url=f"ws://127.0.0.1:{port}/v5/public/linear",
                out=tmp_path, flush_interval=0.2))
            await asyncio.wait_for(done.wait(), 120)
            last_trade = [t["i"] for m in frames if m["topic"].startswith("publicTrade") for t in m["data"]][-1]
            folder = tmp_path / "SOLUSDT_Bybit"
            for _ in range(1200):
                if (f'"u":{expected_u[-1]},'.encode() in tail(newest(folder / "Orderbook"))
                        and last_trade.encode() in tail(newest(folder / "Trade"))):
                    break
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            return await asyncio.to_thread(proc.wait, 30)

    assert asyncio.run(main()) == 0
    assert subscribes == [["orderbook.200.SOLUSDT", "publicTrade.SOLUSDT"], ["orderbook.200.SOLUSDT"]]
    folder = tmp_path / "SOLUSDT_Bybit"
    side = sidecar_totals(tmp_path, "SOLUSDT", "Bybit")
    assert (side["gaps"], side["resyncs"], side["snapshots"]) == (1, 1, 2)
    lines = book_lines(folder)
    assert [m["data"]["u"] for m in lines] == expected_u
    assert [m["type"] for m in lines].count("snapshot") == 2
    files = list_files(folder)
    report = BookReplay(files.symbol, 0, 50).run(files.books)
    assert report.bad_book_lines == 0 and report.book["gaps"] == 0 and report.book["messages"] == len(expected_u)
    recorded = [t for m in frames if m["topic"].startswith("publicTrade") for t in m["data"]]
    csv = pd.read_csv(files.trades[0])
    assert list(zip(csv.trdMatchID, csv.tickDirection, csv.side)) == [(t["i"], t["L"], t["S"]) for t in recorded]
    assert list(csv.timestamp) == [t["T"] / 1000 for t in recorded]


# ------------------------------------------------------------------------------------- downloader
class _Archive(http.server.BaseHTTPRequestHandler):
    """Serves bytes by path with Range support; can cut the first response short."""
    files: dict[str, bytes] = {}
    cut_once: set[str] = set()
    requests: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.requests.append((self.path, self.headers.get("Range", "")))
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.cut_once:
            self.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def archive():
    _Archive.files, _Archive.cut_once, _Archive.requests = {}, set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Archive
    server.shutdown()
    server.server_close()


def _trade_archive(rows: int, seed: int, day: str = "2024-12-01") -> bytes:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp(day, tz="UTC").timestamp()
    lines = ["timestamp,symbol,side,size,price,tickDirection,trdMatchID,grossValue,homeNotional,foreignNotional,RPI"]
    for i in range(rows):
        px, sz = 100 + rng.random(), round(rng.random(), 3) + 0.001
        lines.append(f"{start + i * 0.37:.4f},XRPUSDT,{'Buy' if i % 3 else 'Sell'},{sz},{px:.4f},PlusTick,"
                     f"id-{seed}-{i},{px * sz * 1e8:.0f},{sz},{px * sz:.6f},0")
    # mtime=0 keeps the bytes reproducible; random sizes make the file incompressible enough to span chunks
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def _book_archive(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
    return buf.getvalue()


def test_downloader_resumes_interrupted_download_and_extracts_books(archive, realdata: Path, tmp_path: Path) -> None:
    """Two days of trades and books; the first transfer breaks halfway and resumes with a Range request."""
    url, srv = archive
    book_day1 = (realdata / "bybit" / "2024-12-01_XRPUSDT_ob500.data").read_bytes()
    trades = {d: _trade_archive(20000, i, d) for i, d in enumerate(["2024-12-01", "2024-12-02"])}
    for d, body in trades.items():
        srv.files[f"/trading/XRPUSDT/XRPUSDT{d}.csv.gz"] = body
    srv.files["/orderbook/linear/XRPUSDT/2024-12-01_XRPUSDT_ob500.data.zip"] = _book_archive(
        "2024-12-01_XRPUSDT_ob500.data", book_day1)
    srv.files["/orderbook/linear/XRPUSDT/2024-12-02_XRPUSDT_ob500.data.zip"] = _book_archive(
        "2024-12-02_XRPUSDT_ob500.data", book_day1)
    cut = "/trading/XRPUSDT/XRPUSDT2024-12-01.csv.gz"
    srv.cut_once.add(cut)
    rep = dc.download(["XRPUSDT"], "2024-12-01", "2024-12-02", tmp_path, url, url, backoff=0.01)
    assert not rep.failed and not rep.missing and len(rep.downloaded) == 4
    tried = [r for p, r in srv.requests if p == cut]
    assert len(tried) == 2 and tried[0] == "" and tried[1].startswith("bytes=")
    resumed_at = int(tried[1][6:-1])
    assert 0 < resumed_at <= len(trades["2024-12-01"]) // 2     # only the missing tail was fetched again
    folder = tmp_path / "XRPUSDT_Bybit"
    for d, body in trades.items():
        assert (folder / "Trade" / f"XRPUSDT{d}.csv.gz").read_bytes() == body
    assert (folder / "Orderbook" / "2024-12-01_XRPUSDT_ob500.data").read_bytes() == book_day1
    assert not list(folder.rglob("*.part")) and not list(folder.rglob("*.zip"))
    report = BookReplay("XRPUSDT", 0, 50).run(list_files(folder).books)
    assert report.bad_book_lines == 0 and report.book["messages"] == 100      # 2 × (1 snapshot + 49 deltas)
    assert sum(len(c) for c in iter_trades(folder)) == 40000
    # a second run finds everything present and fetches nothing
    before = len(srv.requests)
    rep = dc.download(["XRPUSDT"], "2024-12-01", "2024-12-02", tmp_path, url, url)
    assert len(rep.skipped) == 4 and len(srv.requests) == before


def test_downloader_rejects_corrupt_and_reports_missing_files(archive, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A right-sized but corrupt gzip is rejected (no file kept); a day absent from the archive is reported."""
    url, srv = archive
    good = _trade_archive(200, 1)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    srv.files["/trading/XRPUSDT/XRPUSDT2024-12-01.csv.gz"] = bytes(bad)
    rep = dc.download(["XRPUSDT"], "2024-12-01", "2024-12-02", tmp_path, url, url, books=False, backoff=0.01)
    assert len(rep.failed) == 1 and "corrupt gzip" in rep.failed[0] and "2024-12-01" in rep.failed[0]
    assert rep.missing == ["XRPUSDT 2024-12-02 trades"]
    assert not (tmp_path / "XRPUSDT_Bybit" / "Trade").exists() or not any((tmp_path / "XRPUSDT_Bybit" / "Trade").iterdir())
    code = dc.main(["download", "--exchange", "bybit", "XRPUSDT", "--start", "2024-12-01", "--end", "2024-12-01",
                    "--no-orderbook", "--archive-url", url, "--out", str(tmp_path)])
    assert code == 1 and "FAILED: XRPUSDT 2024-12-01 trades" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ units
def test_backpressure_drops_are_counted_per_symbol(tmp_path: Path) -> None:
    """A stalled writer: frames beyond the processing queue are dropped, never silently: each is counted in
    its symbol's sidecar (a dropped diff then breaks the pu chain, so the book resyncs)."""
    frames = [orjson.dumps({"stream": f"{s.lower()}@depth@100ms", "data": {"e": "depthUpdate", "s": s}}).decode()
              for s in ["BTCUSDT"] * 4 + ["BTCUSDT"] * 3 + ["ETHUSDT"] * 2]

    async def handler(ws) -> None:
        for f in frames:
            await ws.send(f)
        await ws.wait_closed()

    async def main() -> dc.Recorder:
        rec = dc.Recorder(dc.CollectorSettings(symbols=list(SYMBOLS), out=tmp_path, queue_size=4))
        async with serve(handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with dc.connect(f"ws://127.0.0.1:{port}/public/stream?streams=x") as ws:
                queue: asyncio.Queue = asyncio.Queue(4)      # nobody consumes it: the writer is stalled
                task = asyncio.create_task(rec._receive(ws, queue, "public", list(SYMBOLS)))
                for _ in range(500):
                    if sum(r.integrity.total("dropped") for r in rec.symbols.values()) == 5:
                        break
                    await asyncio.sleep(0.01)
                rec.stop.set()
                assert await task == (9, False) and queue.qsize() == 4
        return rec

    rec = asyncio.run(main())
    assert rec.symbols["BTCUSDT"].integrity.total("dropped") == 3
    assert rec.symbols["ETHUSDT"].integrity.total("dropped") == 2



def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    delays = [[dc.backoff_delay(a, 1.0, 60.0) for a in range(8)] for _ in range(50)]
    for a in range(8):
        nominal = min(60.0, 2.0 ** a)
        seen = [d[a] for d in delays]
        assert all(nominal / 2 <= x <= nominal for x in seen) and len(set(seen)) > 1


def test_cli_rejects_bad_symbols_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert dc.main(["BTC-USDT", "--out", str(tmp_path), "--log-file", ""]) == 2
    assert "invalid symbol" in capsys.readouterr().err and not any(tmp_path.iterdir())
