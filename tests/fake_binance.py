"""A local Binance USD-M stream + REST server that replays real recordings frame by frame (127.0.0.1 only).

Recordings are hftbacktest-style `<local_ns> <json>` lines (see ../shared/realdata/README.md). Depth diffs
are served on `/public/stream?streams=<sym>@depth@100ms`, recorded `trade` events reshaped as aggTrade
payloads on `/market/stream?streams=<sym>@aggTrade`, and `GET /fapi/v1/depth` answers with the book the
server holds at that moment: the recorded REST snapshot advanced by every diff replayed since (so a
resync after a gap or reconnect gets a consistent snapshot, like the real exchange). Frames can be
dropped (the server still applies them to its own book) and connections closed at chosen frames,
optionally with an outage: the next `outage_frames` frames of that route are lost, as on a real exchange;
after that the replay pauses until the client is back. `GET /fapi/v1/aggTrades` serves replayed trades.
"""
from __future__ import annotations

import asyncio
import gzip
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


@dataclass
class Frame:
    """One frame to replay: its route, combined-stream name and payload."""
    route: str
    symbol: str
    stream: str
    payload: dict


@dataclass
class Recording:
    """Everything parsed from the recordings: frames in time order, REST snapshots, tickers and trades."""
    frames: list[Frame] = field(default_factory=list)
    snapshots: dict[str, dict] = field(default_factory=dict)
    tickers: dict[str, dict[int, tuple[float, float, float, float]]] = field(default_factory=dict)
    trade_ids: dict[str, list[int]] = field(default_factory=dict)


def load_recording(paths: list[Path], until_ns: int | None = None) -> Recording:
    """Merge per-symbol recordings (file names usdm_<sym>_<date>.gz) into one time-ordered replay,
    optionally only the lines received before local time until_ns."""
    rows: list[tuple[int, int, str, dict]] = []
    rec = Recording()
    for order, path in enumerate(paths):
        symbol = path.name.split("_")[1].upper()
        rec.tickers.setdefault(symbol, {})
        with gzip.open(path, "rb") as fh:
            for line in fh:
                ns, _, body = line.partition(b" ")
                if until_ns is not None and int(ns) >= until_ns:
                    break
                msg = orjson.loads(body)
                if "lastUpdateId" in msg:
                    rec.snapshots[symbol] = msg
                    continue
                rows.append((int(ns), order, symbol, msg["data"]))
    rows.sort(key=lambda r: (r[0], r[1]))
    for _, _, symbol, data in rows:
        kind = data.get("e")
        if kind == "bookTicker":
            rec.tickers[symbol][int(data["u"])] = (float(data["b"]), float(data["B"]),
                                                  float(data["a"]), float(data["A"]))
        elif kind == "depthUpdate":
            rec.frames.append(Frame("public", symbol, f"{symbol.lower()}@depth@100ms", data))
        elif kind == "trade":
            agg = {"e": "aggTrade", "E": data["E"], "s": data["s"], "a": data["t"], "p": data["p"],
                   "q": data["q"], "nq": data["q"], "f": data["t"], "l": data["t"], "T": data["T"],
                   "m": data["m"]}
            rec.frames.append(Frame("market", symbol, f"{symbol.lower()}@aggTrade", agg))
    for fr in rec.frames:
        if fr.route == "market":
            rec.trade_ids.setdefault(fr.symbol, []).append(int(fr.payload["a"]))
    return rec


class ServerBook:
    """The exchange's own book for one symbol: the recorded snapshot plus every later diff."""

    def __init__(self, snapshot: dict):
        self.bids = {float(p): (p, q) for p, q in snapshot["bids"]}
        self.asks = {float(p): (p, q) for p, q in snapshot["asks"]}
        self.last_u = int(snapshot["lastUpdateId"])
        self.E, self.T = int(snapshot["E"]), int(snapshot["T"])

    def apply(self, diff: dict) -> None:
        """Apply a diff unless it predates the snapshot (absolute sizes, 0 deletes)."""
        if int(diff["u"]) < self.last_u:
            return
        for side, levels in ((self.bids, diff["b"]), (self.asks, diff["a"])):
            for p, q in levels:
                if float(q) == 0.0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = (p, q)
        self.last_u, self.E, self.T = int(diff["u"]), int(diff["E"]), int(diff["T"])

    def snapshot(self, limit: int) -> dict:
        """REST depth answer with the best `limit` levels per side."""
        bids = [list(self.bids[p]) for p in sorted(self.bids, reverse=True)[:limit]]
        asks = [list(self.asks[p]) for p in sorted(self.asks)[:limit]]
        return {"lastUpdateId": self.last_u, "E": self.E, "T": self.T, "bids": bids, "asks": asks}


class FakeBinance:
    """Serve a Recording over websockets (streams) and aiohttp (REST) in a background thread."""

    def __init__(self, rec: Recording, drop: set[int] | None = None, close_after: dict[int, str] | None = None,
                 outage_frames: int = 0, pace_every: int = 200, pace_sleep: float = 0.002, sync_gate: int = 300):
        self.rec = rec
        self.sync_gate = sync_gate              # frame at which the replay waits for every book's first snapshot
        self.drop = drop or set()
        self.close_after = close_after or {}
        self.outage_frames = outage_frames      # frames of a closed route that happen while it is down (lost)
        self.lost_until: dict[str, int] = {}
        self.lost: list[int] = []
        self.cursor = 0
        self.pace_every, self.pace_sleep = pace_every, pace_sleep
        self.books = {sym: ServerBook(snap) for sym, snap in rec.snapshots.items()}
        self.clients: dict[str, ServerConnection] = {}
        self.connections: dict[str, int] = {"public": 0, "market": 0}
        self.paths: list[str] = []
        self.snapshot_requests: dict[str, int] = {}
        self.sent = 0
        self.finished = threading.Event()
        self.ws_port = self.rest_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeBinance":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake Binance server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/fapi/v1/depth", self._depth)
        app.router.add_get("/fapi/v1/aggTrades", self._agg_trades)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.rest_port = site._server.sockets[0].getsockname()[1]
        async with serve(self._ws, "127.0.0.1", 0) as server:
            self.ws_port = next(iter(server.sockets)).getsockname()[1]
            replay = asyncio.create_task(self._replay())
            self._ready.set()
            await self._stop.wait()
            replay.cancel()
            for ws in list(self.clients.values()):
                await ws.close()
        await runner.cleanup()

    # ------------------------------------------------------------------ handlers
    async def _depth(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol", "")
        limit = int(request.query.get("limit", "500"))
        if symbol not in self.books:
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
        self.snapshot_requests[symbol] = self.snapshot_requests.get(symbol, 0) + 1
        return web.Response(body=orjson.dumps(self.books[symbol].snapshot(limit)), content_type="application/json")

    async def _agg_trades(self, request: web.Request) -> web.Response:
        """Historical aggTrades from fromId among the frames already replayed."""
        symbol = request.query.get("symbol", "")
        from_id = int(request.query["fromId"])
        limit = int(request.query.get("limit", "500"))
        rows = [{k: fr.payload[k] for k in ("a", "p", "q", "f", "l", "T", "m")}
                for fr in self.rec.frames[:self.cursor + 1]
                if fr.route == "market" and fr.symbol == symbol and int(fr.payload["a"]) >= from_id][:limit]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")

    async def _ws(self, ws: ServerConnection) -> None:
        path = ws.request.path
        self.paths.append(path)
        parts = urlsplit(path)
        route = parts.path.strip("/").split("/")[0]
        streams = parse_qs(parts.query).get("streams", [""])[0].split("/")
        if route not in self.connections or not parts.path.endswith("/stream") or not streams[0]:
            await ws.close(1008, "unknown route")
            return
        ws.streams = {s.lower() for s in streams}
        self.clients[route] = ws
        self.connections[route] += 1
        try:
            await ws.wait_closed()
        finally:
            if self.clients.get(route) is ws:
                del self.clients[route]

    async def _client(self, route: str) -> ServerConnection:
        """The route's live connection; the replay waits (pauses time) while there is none."""
        while route not in self.clients:
            await asyncio.sleep(0.005)
        return self.clients[route]

    async def _await_first_snapshots(self, timeout: float = 60.0) -> None:
        """Hold the replay until every symbol has asked for its REST snapshot: a fast replay must not run
        the recording past midnight while a loaded machine is still syncing the second book."""
        deadline = time.monotonic() + timeout
        while len(self.snapshot_requests) < len(self.books) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _replay(self) -> None:
        await self._client("public")
        await self._client("market")
        i = 0
        while i < len(self.rec.frames):
            fr = self.rec.frames[i]
            self.cursor = i
            if i == self.sync_gate:
                await self._await_first_snapshots()
            if self.lost_until.get(fr.route, -1) >= i:
                if fr.route == "public":
                    self.books[fr.symbol].apply(fr.payload)
                self.lost.append(i)
                i += 1
                continue
            ws = await self._client(fr.route)
            if fr.route == "public":
                self.books[fr.symbol].apply(fr.payload)
            if i not in self.drop and fr.stream.lower() in ws.streams:
                try:
                    await ws.send(orjson.dumps({"stream": fr.stream, "data": fr.payload}).decode())
                except ConnectionClosed:
                    if self.clients.get(fr.route) is ws:
                        del self.clients[fr.route]
                    await asyncio.sleep(0.005)
                    continue    # resend this frame once the client is back (re-applying a diff is a no-op)
                self.sent += 1
            route_to_close = self.close_after.pop(i, None)
            if route_to_close is not None:     # close only once every book has been synced at least once
                while len(self.snapshot_requests) < len(self.books):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
            if route_to_close in self.clients:
                await self.clients[route_to_close].close(1001, "server restart")
                self.lost_until[route_to_close] = i + self.outage_frames
            i += 1
            if i % self.pace_every == 0:
                await asyncio.sleep(self.pace_sleep)
        self.finished.set()
