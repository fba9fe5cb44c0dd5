"""notifier.py against a local stub of the Discord webhook and the Telegram Bot API (127.0.0.1 only).

The stub records every request (path, JSON body, arrival time), answers from a script (e.g. a 429 with
`retry_after` first) and can hold requests open to play a slow or dead endpoint.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import notifier
from live_fixtures import ROOT, append, equity_record, signal_record, stamp, write_live_fixture, START

WEBHOOK_PATH = "/api/webhooks/1234/webhook-secret-token"
TOKEN = "123456:telegram-secret-token"
WAIT = 60.0


class Stub:
    """A threaded HTTP server on 127.0.0.1 that records POSTs and replies from per-path scripts."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, float]] = []
        self.scripts: dict[str, list[tuple[int, dict]]] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((self.path, body, time.monotonic()))
                    script = stub.scripts.get(self.path.split("?")[0].rsplit("/", 1)[-1], [])
                    status, reply = script.pop(0) if script else (200, {"ok": True})
                stub.hold.wait(WAIT)
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up waiting (a held reply outlived its timeout): no one to answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, kind: str) -> list[dict]:
        with self.lock:
            return [b for p, b, _ in self.requests if (kind == "discord") == p.startswith("/api/webhooks/")]

    def discord_embeds(self) -> list[dict]:
        return [e for body in self.posts("discord") for e in body["embeds"]]

    def telegram_text(self) -> str:
        return "\n\n".join(b["text"] for b in self.posts("telegram"))

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def config(stub: Stub, **kw) -> notifier.NotifierConfig:
    return notifier.NotifierConfig(discord_webhook=stub.url + WEBHOOK_PATH, telegram_token=TOKEN,
                                   telegram_chat_id="42", telegram_api_url=stub.url, **kw)


def until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def event(fx, kind: str, message: str, **extra) -> dict:
    return dict(stamp(START, fx.symbol, fx.mode), event=kind, level="warning", message=message, **extra)


def test_each_journal_event_is_sent_once_and_old_lines_are_not(stub: Stub, tmp_path: Path) -> None:
    fx = write_live_fixture(tmp_path, heartbeat_ms=int(START.timestamp() * 1000))
    big = dict(signal_record(100, fx.symbol, fx.mode), p_dir_long=0.95,
               intents=[{"kind": "market", "side": 1, "price": None, "qty": 0.5, "tp_dist": 8.0, "sl_dist": 0.8,
                         "reason": "breakout"}])
    append(fx.journal("signals"), [dict(signal_record(99, fx.symbol, fx.mode), p_dir_long=0.97)], torn="")
    clock = [START.timestamp() + 30.0]
    n = notifier.Notifier(config(stub))
    watcher = notifier.JournalWatcher(n, fx.logs, fx.state, offline_sec=120, drawdown_pct=2.0,
                                      signal_threshold=0.9, clock=lambda: clock[0])
    watcher.poll()  # everything already in the journals (a startup, a 0.97 signal) stays unsent
    append(fx.journal("events"), [event(fx, "startup", "engine started again"),
                                  event(fx, "error", "e1"), event(fx, "error", "e2"), event(fx, "error", "e3"),
                                  event(fx, "kill_switch", "kill-switch: flattened"),
                                  event(fx, "reconcile_failed", "exchange unreachable"),
                                  event(fx, "external", "external position 0.3"),
                                  event(fx, "drift", "PSI 0.4 on ob_imbalance"),
                                  event(fx, "model_loaded", "not a notification")])
    append(fx.journal("signals"), [big])
    append(fx.journal("equity"), [dict(equity_record(100, fx), day_pnl=-25.0)])
    append(fx.journal("trades"), [dict(stamp(START, fx.symbol, fx.mode), event="filled", kind="entry", side="Buy",
                                       price=100.0, qty=0.5, reason="breakout", order_link_id="x")])
    clock[0] += 200.0  # the heartbeat is now 230 s old
    watcher.poll()
    watcher.poll()
    n.close(WAIT)
    titles = [e["title"] for e in stub.discord_embeds()]
    kinds = ["started", "error", "kill_switch", "reconcile_failed", "external", "drift", "signal", "breakout",
             "drawdown", "offline"]
    assert sorted(t.split(": ")[-1] for t in titles) == sorted(kinds)
    descriptions = "\n".join(e["description"] for e in stub.discord_embeds())
    assert "engine started again" in descriptions and "3 errors; last: e3" in descriptions
    assert "0.97" not in descriptions and "not a notification" not in descriptions and "order_link_id" not in descriptions
    text = stub.telegram_text()
    assert all(f"{fx.symbol} [paper]: {k}" in text or f"{fx.symbol}: {k}" in text for k in kinds)
    assert text.count(": started\n") == 1 and text.count(": offline\n") == 1


def test_cooldown_per_kind_and_symbol(stub: Stub) -> None:
    clock = [1000.0]
    n = notifier.Notifier(config(stub, cooldown_sec=60.0), clock=lambda: clock[0])
    assert n.send({"event": "error", "symbol": "BTCUSDT", "message": "first"})
    clock[0] = 1030.0
    assert not n.send({"event": "error", "symbol": "BTCUSDT", "message": "within cooldown"})
    assert n.send({"event": "error", "symbol": "ETHUSDT", "message": "other symbol"})
    assert n.send({"event": "started", "symbol": "BTCUSDT", "message": "start 1"})
    assert n.send({"event": "started", "symbol": "BTCUSDT", "message": "start 2"})  # started: no cooldown
    clock[0] = 1061.0
    assert n.send({"event": "error", "symbol": "BTCUSDT", "message": "after cooldown"})
    assert not n.send({"event": "fill", "symbol": "BTCUSDT", "message": "fills are off by default"})
    n.close(WAIT)
    sent = [e["description"] for e in stub.discord_embeds()]
    assert sorted(sent) == sorted(["first", "other symbol", "start 1", "start 2", "after cooldown"])
    assert n.suppressed == 1


def test_429_retry_after_is_honoured_and_capped(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    stub.scripts["webhook-secret-token"] = [(429, {"message": "rate limited", "retry_after": 0.3, "global": False})]
    stub.scripts["sendMessage"] = [(429, {"ok": False, "error_code": 429, "parameters": {"retry_after": 1000}})]
    waits: list[float] = []
    n = notifier.Notifier(config(stub, max_retry_wait_sec=0.5))
    real_wait = n.wait
    n.wait = lambda s: (waits.append(s), real_wait(s))
    with caplog.at_level(logging.DEBUG):
        n.send({"event": "watchdog", "symbol": "BTCUSDT", "level": "error", "message": "engine exited with code 4"})
        n.close(WAIT)
    assert "rate limited (429)" in caplog.text
    assert "webhook-secret-token" not in caplog.text and "telegram-secret-token" not in caplog.text
    assert waits == [0.3, 0.5]  # Discord's own retry_after; Telegram's 1000 s capped
    discord = [t for p, _, t in stub.requests if p.startswith("/api/webhooks/")]
    assert len(discord) == 2 and discord[1] - discord[0] >= 0.3
    assert [e["description"] for e in stub.discord_embeds()] == ["engine exited with code 4"] * 2
    assert len(stub.posts("telegram")) == 2 and n.sent == 2 and n.failed == 0


def dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("notification dropped")]


def test_every_dropped_notification_is_named_with_secrets_masked(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    """A cooldown, 429s until the attempts run out, a refusal (4xx), a full queue and a close with notices still
    queued: each drop is logged with the notice's kind, symbol and first line, never a token or webhook URL."""
    clock = [1000.0]
    stub.scripts["webhook-secret-token"] = [(429, {"retry_after": 0})] * 2
    stub.scripts["sendMessage"] = [(400, {"ok": False, "description": "Bad Request: chat not found"})]
    with caplog.at_level(logging.INFO, logger="notifier"):
        n = notifier.Notifier(config(stub, max_attempts=2), clock=lambda: clock[0], wait=lambda s: None)
        assert n.send({"event": "drift", "symbol": "BTCUSDT", "mode": "paper",
                       "message": f"PSI 0.41 on ob_imbalance\nposted via {stub.url + WEBHOOK_PATH}"})
        assert not n.send({"event": "drift", "symbol": "BTCUSDT", "message": f"PSI 0.52 via {TOKEN}"})
        n.close(WAIT)
        assert dropped(caplog) == [
            "notification dropped (cooldown 60 s): BTCUSDT: drift: PSI 0.52 via ***",
            "notification dropped (discord not reached after 2 attempt(s)): BTCUSDT [paper]: drift: PSI 0.41 on ob_imbalance",
            "notification dropped (telegram rejected it with HTTP 400): BTCUSDT [paper]: drift: PSI 0.41 on ob_imbalance"]
        caplog.clear()
        stub.hold.clear()  # the endpoint accepts and never answers: the sender is stuck on the first notice
        m = notifier.Notifier(config(stub, queue_size=1, timeout_sec=WAIT))
        assert m.send({"event": "watchdog", "symbol": "ETHUSDT", "message": "engine restarting"})
        until(lambda: len(stub.requests) == 4, "the first notice in flight")
        assert m.send({"event": "error", "symbol": "ETHUSDT", "message": "queued behind it\nsecond line"})
        assert not m.send({"event": "kill_switch", "symbol": "ETHUSDT", "message": "x" * 200})
        m.close(0.2)
        assert dropped(caplog) == [
            f"notification dropped (queue full, 1 waiting): ETHUSDT: kill_switch: {'x' * 80}...",
            "notification dropped (the notifier closed before it was sent): ETHUSDT: error: queued behind it"]
    assert "secret-token" not in caplog.text


def test_burst_is_merged_within_discord_and_telegram_limits(stub: Stub) -> None:
    stub.hold.clear()
    n = notifier.Notifier(config(stub))
    n.send({"event": "drift", "symbol": "S00", "message": "first"})
    until(lambda: len(stub.requests) == 1, "the first request in flight")
    messages = [f"burst {i:02d} " + "x" * 700 for i in range(1, 25)]
    for i, msg in enumerate(messages, start=1):
        assert n.send({"event": "drift", "symbol": f"S{i:02d}", "message": msg})
    stub.hold.set()
    n.close(WAIT)
    payloads = [b["embeds"] for b in stub.posts("discord")]
    assert [len(p) for p in payloads][0] == 1 and len(payloads) < 25
    for embeds in payloads:
        assert len(embeds) <= 10 and sum(len(e["title"]) + len(e["description"]) for e in embeds) <= 6000
    assert sorted(e["description"] for e in stub.discord_embeds()) == sorted(["first"] + messages)
    texts = [b["text"] for b in stub.posts("telegram")]
    assert all(len(t) <= 4096 for t in texts) and len(texts) < 25
    assert all(stub.telegram_text().count(m) == 1 for m in messages)


def test_dead_endpoint_never_blocks_and_secrets_are_never_logged(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    stub.hold.clear()  # the endpoint accepts and never answers
    n = notifier.Notifier(config(stub, timeout_sec=0.5, max_attempts=2))
    with caplog.at_level(logging.DEBUG):
        n.send({"event": "error", "symbol": "BTCUSDT", "message": "one"})
        until(lambda: len(stub.requests) >= 1, "a request held by the dead endpoint")
        for i in range(200):  # the sender is stuck; send() still returns at once
            assert n.send({"event": "error", "symbol": f"S{i}", "message": str(i)})
        n.close(1.0)
    refused = notifier.NotifierConfig(discord_webhook="http://127.0.0.1:9" + WEBHOOK_PATH, telegram_token=TOKEN,
                                      telegram_chat_id="42", telegram_api_url="http://127.0.0.1:9", max_attempts=1)
    with caplog.at_level(logging.DEBUG):
        m = notifier.Notifier(refused)
        m.send({"event": "error", "symbol": "BTCUSDT", "message": "to nowhere"})
        m.close(WAIT)
    assert m.failed == 2 and "send failed" in caplog.text
    assert "webhook-secret-token" not in caplog.text and "telegram-secret-token" not in caplog.text


def test_cli_alone_sends_new_events_once_and_keeps_secrets_out_of_its_log(stub: Stub, tmp_path: Path) -> None:
    fx = write_live_fixture(tmp_path)
    cmd = [sys.executable, str(ROOT / "notifier.py"), "--log-dir", str(fx.logs), "--state-dir", str(fx.state),
           "--discord-webhook", stub.url + WEBHOOK_PATH, "--telegram-chat-id", "42",
           "--telegram-api-url", stub.url, "--notify-poll-sec", "0.2"]
    env = {**os.environ, "TELEGRAM_BOT_TOKEN": TOKEN}
    with open(tmp_path / "notifier.log", "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, env=env)
        try:
            until(lambda: "watching" in (tmp_path / "notifier.log").read_text(), "the notifier to start")
            append(fx.journal("events"), [event(fx, "reconcile_failed", "reconcile failed at startup")])
            until(lambda: len(stub.posts("telegram")) == 1 and len(stub.posts("discord")) == 1, "one message each")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
        finally:
            proc.kill()
    assert [e["description"] for e in stub.discord_embeds()] == ["reconcile failed at startup"]
    assert stub.posts("telegram")[0]["chat_id"] == "42" and "engine started" not in stub.telegram_text()
    assert f"/bot{TOKEN}/sendMessage" in [p for p, _, _ in stub.requests]  # the token from TELEGRAM_BOT_TOKEN
    log_text = (tmp_path / "notifier.log").read_text()
    assert "webhook-secret-token" not in log_text and "telegram-secret-token" not in log_text
