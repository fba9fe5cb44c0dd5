"""Discord and Telegram notifications from the live files (DESIGN.md §3): the one sender of notifications.

    python notifier.py --log-dir logs --state-dir state --discord-webhook URL
                       --telegram-token TOKEN --telegram-chat-id ID [--notify-* ...]

Library use (the watchdog's alerts, the dashboard's thread):

    n = Notifier(NotifierConfig.from_env())       # or NotifierConfig(discord_webhook=..., ...)
    n.send({"event": "watchdog", "symbol": "BTCUSDT", "level": "error", "message": "engine exited 4"})
    n.close()                                     # flush (bounded wait), then stop the sender thread

`send()` never blocks: it applies the kind's on/off switch and cooldown, then queues. One background
thread drains the queue, merges what piled up into as few requests as the limits allow (Discord: 10
embeds and 6,000 characters per message; Telegram: 4,096 characters), and retries an HTTP 429 after
its `retry_after` (Discord: body or Retry-After header; Telegram: `parameters.retry_after`), each
wait capped by `max_retry_wait_sec`. A dead or slow endpoint delays only that thread. Every notice that
is not sent (cooldown, queue full, an endpoint that refuses it or stays unreachable, still queued at
`close()`) gets a log line naming it: title (symbol, mode, kind) and its text's first line. The token and
webhook URL are never logged: errors are logged with them replaced by `***`.

`JournalWatcher` turns what the engine appends to `events_`, `signals_`, `equity_` and `trades_<SYM>.jsonl`
and the age of `state/heartbeat_<SYM>.json` into notices; lines already in the journals when it starts
are not sent again.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import orjson
import requests

from journal_tail import JournalTail

log = logging.getLogger("notifier")

TELEGRAM_API = "https://api.telegram.org"
DISCORD_MAX_EMBEDS, DISCORD_MAX_CHARS, DISCORD_MAX_DESCRIPTION, DISCORD_MAX_TITLE = 10, 6000, 4096, 256
TELEGRAM_MAX_CHARS = 4096
SUMMARY_CHARS = 80   # of a notice's first line, in the log line of a dropped notice
# kind -> what it reports; "fill" is off unless asked for.
KINDS = {"started": "engine started", "stopped": "engine stopped", "offline": "heartbeat older than the limit",
         "error": "engine errors (merged per burst)", "drawdown": "daily drawdown beyond the limit",
         "kill_switch": "kill-switch fired", "reconcile_failed": "reconciliation failed",
         "external": "external position or order", "drift": "feature drift alert", "stale_data": "stale market data",
         "signal": "high-confidence model signal", "breakout": "breakout (taker) entry intent", "fill": "order fill",
         "watchdog": "watchdog alert"}
DEFAULT_OFF = frozenset({"fill"})
DEFAULT_COOLDOWNS = {"started": 0.0, "stopped": 0.0}
# events_<SYM>.jsonl `event` -> notice kind (reconciled and model_loaded are not sent).
EVENT_KINDS = {"startup": "started", "shutdown": "stopped", "error": "error", "reconcile_failed": "reconcile_failed",
               "external": "external", "kill_switch": "kill_switch", "drift": "drift", "stale_data": "stale_data"}
COLORS = {"info": 0x3498DB, "warning": 0xF39C12, "error": 0xE74C3C, "critical": 0x8E44AD}
SKIP_FIELDS = {"event", "level", "message", "symbol", "ts", "time", "mode"}


@dataclass
class NotifierConfig:
    """Where to send and how often. Times in seconds."""
    discord_webhook: str = ""
    telegram_token: str = ""
    telegram_chat_id: str = ""
    telegram_api_url: str = TELEGRAM_API
    cooldown_sec: float = 60.0
    cooldowns: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COOLDOWNS))
    disabled: frozenset[str] = DEFAULT_OFF
    timeout_sec: float = 10.0
    max_retry_wait_sec: float = 30.0
    max_attempts: int = 4
    queue_size: int = 1000

    @classmethod
    def from_env(cls, **overrides: Any) -> "NotifierConfig":
        """Destinations from DISCORD_WEBHOOK_URL, TELEGRAM_BOT_TOKEN, TELEGRAM_CHAT_ID unless given."""
        env = {"discord_webhook": "DISCORD_WEBHOOK_URL", "telegram_token": "TELEGRAM_BOT_TOKEN",
               "telegram_chat_id": "TELEGRAM_CHAT_ID"}
        for key, var in env.items():
            if not overrides.get(key):
                overrides[key] = os.environ.get(var, "")
        return cls(**overrides)

    def configured(self) -> bool:
        return bool(self.discord_webhook or (self.telegram_token and self.telegram_chat_id))

    def secrets(self) -> list[str]:
        """Strings that must never reach a log: the webhook URL and its path, the bot token."""
        out = [self.discord_webhook, urlparse(self.discord_webhook).path if self.discord_webhook else "",
               self.telegram_token]
        return sorted((s for s in out if len(s) > 4), key=len, reverse=True)


@dataclass
class Notice:
    kind: str
    symbol: str
    level: str
    title: str
    text: str
    time: str

    def summary(self) -> str:
        """The title (symbol, mode, kind) and the text's first line cut to SUMMARY_CHARS: what a log line names."""
        first = self.text.split("\n", 1)[0]
        return f"{self.title}: {first[:SUMMARY_CHARS]}{'...' if len(first) > SUMMARY_CHARS else ''}"


def notice_from_event(event: dict, now: float) -> Notice:
    """An event dict (`event` = kind, optional symbol, level, message and detail fields) -> Notice."""
    kind = str(event.get("event", "watchdog"))
    symbol = str(event.get("symbol", ""))
    details = [f"{k}: {v}" for k, v in event.items() if k not in SKIP_FIELDS and v not in (None, "")]
    text = "\n".join([str(event.get("message", KINDS.get(kind, kind)))] + details)
    when = event.get("time") or datetime.fromtimestamp(now, tz=timezone.utc).isoformat()
    mode = f" [{event['mode']}]" if event.get("mode") else ""
    return Notice(kind, symbol, str(event.get("level", "info")), f"{symbol or 'PurpleSky'}{mode}: {kind}", text, str(when))


def discord_batches(notices: list[Notice]) -> list[tuple[dict, list[Notice]]]:
    """(webhook payload, the notices in it): at most 10 embeds and 6,000 characters (titles + descriptions) each."""
    payloads: list[tuple[dict, list[Notice]]] = []
    embeds: list[dict] = []
    members: list[Notice] = []
    chars = 0
    for n in notices:
        title = n.title[:DISCORD_MAX_TITLE]
        desc = n.text[:min(DISCORD_MAX_DESCRIPTION, DISCORD_MAX_CHARS - len(title))]
        size = len(title) + len(desc)
        if embeds and (len(embeds) == DISCORD_MAX_EMBEDS or chars + size > DISCORD_MAX_CHARS):
            payloads.append(({"embeds": embeds}, members))
            embeds, members, chars = [], [], 0
        embeds.append({"title": title, "description": desc, "color": COLORS.get(n.level, COLORS["info"]),
                       "timestamp": n.time})
        members.append(n)
        chars += size
    if embeds:
        payloads.append(({"embeds": embeds}, members))
    return payloads


def telegram_batches(notices: list[Notice]) -> list[tuple[str, list[Notice]]]:
    """(message text, the notices in it): at most 4,096 characters, notices joined by blank lines; a longer one
    is cut."""
    texts: list[tuple[str, list[Notice]]] = []
    for n in notices:
        block = f"{n.title}\n{n.text}"[:TELEGRAM_MAX_CHARS]
        if texts and len(texts[-1][0]) + 2 + len(block) <= TELEGRAM_MAX_CHARS:
            texts[-1] = (texts[-1][0] + "\n\n" + block, [*texts[-1][1], n])
        else:
            texts.append((block, [n]))
    return texts


def retry_after(resp: requests.Response) -> float:
    """Seconds to wait from a 429: Discord `retry_after`, Telegram `parameters.retry_after`, or Retry-After."""
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if isinstance(body, dict):
        for value in (body.get("retry_after"), (body.get("parameters") or {}).get("retry_after")):
            if isinstance(value, (int, float)) and value >= 0:
                return float(value)
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class Notifier:
    """Queue notices and send them from one background thread; `send()` never blocks."""

    def __init__(self, cfg: NotifierConfig, clock: Callable[[], float] = time.time,
                 wait: Callable[[float], Any] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self._closing = threading.Event()
        self.wait = wait or self._closing.wait
        self._queue: queue.Queue[Notice] = queue.Queue(maxsize=cfg.queue_size)
        self._last: dict[tuple[str, str, str], float] = {}
        self._session = requests.Session()
        self.sent = self.suppressed = self.failed = 0
        # urllib3 logs request paths at DEBUG, and a Telegram path holds the bot token.
        logging.getLogger("urllib3").setLevel(max(logging.getLogger("urllib3").getEffectiveLevel(), logging.INFO))
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> bool:
        """Queue one event unless its kind is off or cooling down. Returns whether it was queued."""
        kind = str(event.get("event", "watchdog"))
        if kind in self.cfg.disabled or not self.cfg.configured():
            return False
        now = self.clock()
        notice = notice_from_event(event, now)
        key = (kind, str(event.get("symbol", "")), str(event.get("side", "")))
        cooldown = self.cfg.cooldowns.get(kind, self.cfg.cooldown_sec)
        if key in self._last and now - self._last[key] < cooldown:
            self.suppressed += 1
            self._dropped([notice], f"cooldown {cooldown:g} s", logging.INFO)
            return False
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            self._dropped([notice], f"queue full, {self.cfg.queue_size} waiting")
            return False
        self._last[key] = now
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` s for the queue to drain, then stop the sender; notices still queued are dropped
        (and logged)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        self._closing.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
        pending: list[Notice] = []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
            self._queue.task_done()
        self._dropped(pending, "the notifier closed before it was sent")

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._deliver(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _deliver(self, batch: list[Notice]) -> None:
        cfg = self.cfg
        if cfg.discord_webhook:
            for payload, members in discord_batches(batch):
                self._count(self._post("discord", cfg.discord_webhook, {"username": "PurpleSky", **payload}, members))
        if cfg.telegram_token and cfg.telegram_chat_id:
            url = f"{cfg.telegram_api_url.rstrip('/')}/bot{cfg.telegram_token}/sendMessage"
            for text, members in telegram_batches(batch):
                self._count(self._post("telegram", url, {"chat_id": cfg.telegram_chat_id, "text": text,
                                                         "disable_web_page_preview": True}, members))

    def _count(self, ok: bool) -> None:
        if ok:
            self.sent += 1
        else:
            self.failed += 1

    def _post(self, dest: str, url: str, payload: dict, notices: list[Notice]) -> bool:
        """POST with retries: 429 waits its retry_after, errors and 5xx back off; both capped. True if delivered;
        otherwise each of `notices` (what the payload carries) is logged as dropped."""
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                resp = self._session.post(url, json=payload, timeout=self.cfg.timeout_sec)
            except requests.RequestException as exc:
                delay = float(2 ** (attempt - 1))
                log.warning("%s: send failed (%s: %s), attempt %d/%d", dest, type(exc).__name__,
                            self._redact(str(exc)), attempt, self.cfg.max_attempts)
            else:
                if resp.status_code < 300:
                    return True
                if resp.status_code == 429:
                    delay = retry_after(resp)
                    log.warning("%s: rate limited (429), retry after %.2f s (cap %.1f s)", dest, delay,
                                self.cfg.max_retry_wait_sec)
                elif resp.status_code >= 500:
                    delay = float(2 ** (attempt - 1))
                    log.warning("%s: HTTP %d, attempt %d/%d", dest, resp.status_code, attempt, self.cfg.max_attempts)
                else:
                    log.warning("%s: rejected with HTTP %d: %s", dest, resp.status_code, self._redact(resp.text[:300]))
                    self._dropped(notices, f"{dest} rejected it with HTTP {resp.status_code}")
                    return False
            if attempt == self.cfg.max_attempts or self._closing.is_set():
                break
            self.wait(min(delay, self.cfg.max_retry_wait_sec))
        self._dropped(notices, f"{dest} not reached after {attempt} attempt(s)")
        return False

    def _dropped(self, notices: list[Notice], why: str, level: int = logging.WARNING) -> None:
        """One log line per dropped notice naming it (kind, symbol, first line of its text; secrets masked)."""
        for n in notices:
            log.log(level, "notification dropped (%s): %s", why, self._redact(n.summary()))

    def _redact(self, text: str) -> str:
        for secret in self.cfg.secrets():
            text = text.replace(secret, "***")
        return text


# ---------------------------------------------------------------- reading the live files
SYMBOL_RE = re.compile(r"^(events|signals|equity|trades)_([A-Z0-9]{2,30})\.jsonl$")


def heartbeat_age(path: Path, now: float) -> tuple[float, str] | None:
    """(age in s, phase) of a heartbeat file, `ts` in ms; None when missing or unreadable."""
    try:
        hb = orjson.loads(path.read_bytes())
        return now - float(hb["ts"]) / 1000.0, str(hb.get("phase", ""))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class JournalWatcher:
    """Turn new journal lines and stale heartbeats into `Notifier.send` calls; `poll()` once, or `start()`."""

    def __init__(self, notifier: Notifier, log_dir: str | Path, state_dir: str | Path, offline_sec: float = 120.0,
                 drawdown_pct: float = 2.0, signal_threshold: float = 0.9, clock: Callable[[], float] = time.time) -> None:
        self.notifier = notifier
        self.log_dir, self.state_dir = Path(log_dir), Path(state_dir)
        self.offline_sec, self.drawdown_pct, self.signal_threshold = offline_sec, drawdown_pct, signal_threshold
        self.clock = clock
        self.tails: dict[Path, JournalTail] = {}
        self.offline: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._discover(from_end=True)

    def _discover(self, from_end: bool) -> None:
        if self.log_dir.is_dir():
            for path in sorted(self.log_dir.iterdir()):
                if SYMBOL_RE.match(path.name) and path not in self.tails:
                    self.tails[path] = JournalTail(path, from_end=from_end)

    def poll(self) -> None:
        """Read what was appended since the last poll and check every heartbeat."""
        self._discover(from_end=False)
        for path, tail in self.tails.items():
            journal = SYMBOL_RE.match(path.name).group(1)  # type: ignore[union-attr]
            records = tail.read_new()
            if records:
                getattr(self, f"_on_{journal}")(records)
        self._check_heartbeats()

    def _send(self, kind: str, rec: dict, level: str, message: str, **details: Any) -> None:
        """Send a notice about journal record `rec` (its symbol, mode and time carried over)."""
        self.notifier.send({"event": kind, "symbol": rec.get("symbol", ""), "mode": rec.get("mode", ""),
                            "time": rec.get("time"), "level": level, "message": message, **details})

    def _on_events(self, records: list[dict]) -> None:
        errors = [r for r in records if r.get("event") == "error"]
        for rec in records:
            kind = EVENT_KINDS.get(str(rec.get("event")))
            if kind is not None and kind != "error":
                self.notifier.send(dict(rec, event=kind))
        if errors:
            last = errors[-1]
            msg = last.get("message", "") if len(errors) == 1 else f"{len(errors)} errors; last: {last.get('message', '')}"
            self._send("error", last, "error", msg)

    def _on_signals(self, records: list[dict]) -> None:
        for rec in records:
            for side in ("long", "short"):
                probs = {f"{p}_{side}": rec.get(f"{p}_{side}") for p in ("p_exec", "p_dir")}
                best = max((v for v in probs.values() if isinstance(v, (int, float))), default=-math.inf)
                if best >= self.signal_threshold:
                    self._send("signal", rec, "info", f"{side} signal at bar {rec.get('bar_time')}, "
                               f"close {rec.get('close')}", side=side, **probs)
            for intent in rec.get("intents") or []:
                if isinstance(intent, dict) and intent.get("reason") == "breakout" and intent.get("kind") == "market":
                    side = "long" if intent.get("side") in (1, "long", "Buy") else "short"
                    self._send("breakout", rec, "info", f"breakout {side} entry at market, qty {intent.get('qty')}",
                               tp_dist=intent.get("tp_dist"), sl_dist=intent.get("sl_dist"))

    def _on_equity(self, records: list[dict]) -> None:
        rec = records[-1]
        start, pnl = rec.get("day_start_equity"), rec.get("day_pnl")
        if isinstance(start, (int, float)) and isinstance(pnl, (int, float)) and start > 0 \
                and -pnl / start * 100.0 >= self.drawdown_pct:
            self._send("drawdown", rec, "warning", f"daily PnL {pnl:.2f} ({pnl / start:.2%} of the day's start "
                       f"equity {start:.2f})", kill_switch=rec.get("kill_switch"))

    def _on_trades(self, records: list[dict]) -> None:
        for rec in records:
            if rec.get("event") in ("filled", "partially_filled"):
                self._send("fill", rec, "info", f"{rec.get('kind')} {rec.get('side')} {rec.get('qty')} @ {rec.get('price')}",
                           order_link_id=rec.get("order_link_id"), reason=rec.get("reason"))

    def _check_heartbeats(self) -> None:
        if not self.state_dir.is_dir():
            return
        now = self.clock()
        for path in self.state_dir.glob("heartbeat_*.json"):
            symbol = path.stem.removeprefix("heartbeat_")
            seen = heartbeat_age(path, now)
            if seen is None:
                continue
            age, phase = seen
            if age <= self.offline_sec or phase == "stopping":
                self.offline.discard(symbol)
            elif symbol not in self.offline:
                self.offline.add(symbol)
                self.notifier.send({"event": "offline", "symbol": symbol, "level": "critical",
                                    "message": f"no heartbeat for {age:.0f} s (limit {self.offline_sec:.0f} s), "
                                               f"last phase {phase or '?'}"})

    def start(self, poll_sec: float) -> None:
        """Poll every `poll_sec` s in a daemon thread until `stop()`."""
        def loop() -> None:
            while not self._stop.wait(poll_sec):
                try:
                    self.poll()
                except Exception:  # a bad file must not end the notifications of every other one
                    log.exception("notifier poll failed")
        self._thread = threading.Thread(target=loop, name="journal-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.notifier.close()


# ---------------------------------------------------------------- CLI (also the dashboard's notifier flags)
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("notifications (Discord webhook, Telegram sendMessage)")
    g.add_argument("--discord-webhook", default="", help="webhook URL (else DISCORD_WEBHOOK_URL)")
    g.add_argument("--telegram-token", default="", help="bot token (else TELEGRAM_BOT_TOKEN)")
    g.add_argument("--telegram-chat-id", default="", help="chat id (else TELEGRAM_CHAT_ID)")
    g.add_argument("--telegram-api-url", default=TELEGRAM_API, help="Telegram Bot API base URL")
    g.add_argument("--notify-offline-sec", type=float, default=120.0, help="engine offline after this heartbeat age")
    g.add_argument("--notify-poll-sec", type=float, default=5.0, help="how often the journals are read")
    g.add_argument("--notify-cooldown-sec", type=float, default=60.0, help="min seconds between two notices of a kind")
    g.add_argument("--notify-cooldown", action="append", default=[], metavar="KIND=SEC", help="per-kind cooldown")
    g.add_argument("--notify-drawdown-pct", type=float, default=2.0, help="daily loss, %% of the day's start equity")
    g.add_argument("--notify-signal-threshold", type=float, default=0.9, help="probability of a high-confidence signal")
    g.add_argument("--notify-off", default="", metavar="KIND,...", help=f"kinds not sent; kinds: {', '.join(KINDS)}")
    g.add_argument("--notify-fills", action="store_true", help="also send every fill")


def config_from_args(args: argparse.Namespace) -> NotifierConfig:
    """NotifierConfig from the flags above (environment fallbacks); ValueError naming a bad flag value."""
    cooldowns = dict(DEFAULT_COOLDOWNS)
    for spec in args.notify_cooldown:
        kind, _, sec = spec.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--notify-cooldown {spec}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        cooldowns[kind] = float(sec)
    off = {k for k in args.notify_off.split(",") if k}
    unknown = off - set(KINDS)
    if unknown:
        raise ValueError(f"--notify-off: unknown kind(s) {', '.join(sorted(unknown))}; kinds: {', '.join(KINDS)}")
    if not args.notify_fills:
        off |= DEFAULT_OFF
    return NotifierConfig.from_env(discord_webhook=args.discord_webhook, telegram_token=args.telegram_token,
                                   telegram_chat_id=args.telegram_chat_id, telegram_api_url=args.telegram_api_url,
                                   cooldown_sec=args.notify_cooldown_sec, cooldowns=cooldowns, disabled=frozenset(off))


def watcher_from_args(args: argparse.Namespace) -> JournalWatcher | None:
    """A JournalWatcher over --log-dir/--state-dir when a destination is configured, else None."""
    cfg = config_from_args(args)
    if not cfg.configured():
        return None
    return JournalWatcher(Notifier(cfg), args.log_dir, args.state_dir, offline_sec=args.notify_offline_sec,
                          drawdown_pct=args.notify_drawdown_pct, signal_threshold=args.notify_signal_threshold)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Send Discord/Telegram notifications from the live engine's files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--state-dir", default="state")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        watcher = watcher_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if watcher is None:
        log.error("no destination: give --discord-webhook or --telegram-token with --telegram-chat-id "
                  "(or DISCORD_WEBHOOK_URL / TELEGRAM_BOT_TOKEN + TELEGRAM_CHAT_ID)")
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("watching %s and %s (Ctrl-C stops)", args.log_dir, args.state_dir)
    try:
        while not stop.wait(args.notify_poll_sec):
            watcher.poll()
    except KeyboardInterrupt:
        pass
    watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
