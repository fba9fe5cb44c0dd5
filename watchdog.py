"""watchdog.py — keep the live engine running, never restart it into danger.

    python watchdog.py --symbol BTCUSDT -- --keys-file keys.json --testnet   # args after -- go to the engine
    python watchdog.py --write-launchers --symbol BTCUSDT -- --keys-file keys.json --live

Supervises one `live_trading_v2.py --symbol SYM ...` process (standard library only):
- exit-code contract (DESIGN.md §3): 0 clean stop → no restart; 2 bad arguments/config/keys/model,
  3 startup checks refused, 4 reconciliation failed → no restart, alert, the watchdog exits with that
  code; anything else is a crash → restart after `--backoff-base` seconds doubling up to
  `--backoff-max` (back to the base after a run of `--stable-sec`); more than `--max-restarts` restarts
  in one hour → alert and exit 1.
- heartbeat `state/heartbeat_<SYM>.json` (`ts` in ms, `pid`, `phase`, `open_positions`,
  `last_stop_check`, `model`): no new heartbeat for `--stale-sec` → graceful stop (SIGTERM to the
  engine's process group; on Windows CTRL_BREAK_EVENT to its own process group), a hard kill after
  `--grace-sec`, then a restart as after a crash. Never a hard kill while the engine reports
  `flattening` or `settling`, unless its heartbeat has been stale for more than `--settle-stale-sec`.
- no kills on log lines or network probes; one watchdog per symbol (an OS lock on
  `state/watchdog_<SYM>.lock`); it refuses to start beside a live engine it does not own.
- SIGINT/SIGTERM (and SIGHUP/SIGBREAK) stop the engine gracefully, then the watchdog exits 0.
- logs to `logs/watchdog_<SYM>.log`; each restart, and a final "gave up" or "not restarting", is also
  appended to `logs/watchdog_<SYM>.jsonl` (one JSON line: `ts`, `time`, `symbol`, `mode`, `event` =
  "restart", "gave_up" or "not_restarted", `cause` such as "crash, exit 1", "killed by signal 9" or
  "heartbeat stale", `exit_code`, `backoff_s`, `restart` of `max_restarts` this hour), which the dashboard
  shows; alerts (stating open positions and when stops were last verified) go through
  `notifier.py`, imported only when alerts are configured.

Watchdog exit codes: 0 clean stop (engine's 0, or a stop requested by signal); 1 too many restarts;
2 bad watchdog arguments, another watchdog holds the symbol, or the engine exited 2; 3 and 4 the engine's.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import getpass
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO, Any, Callable

HERE = Path(__file__).resolve().parent
ENGINE_SCRIPT = "live_trading_v2.py"
NO_RESTART = {
    2: "bad arguments, config, keys or model",
    3: "startup checks refused (key permissions, clock, account mode)",
    4: "reconciliation failed",
}
RESTART_CAUSES = {5: "the exchange could not be reached at startup"}   # restarted with backoff, as a crash
EXIT_CLEAN, EXIT_GAVE_UP, EXIT_REFUSED = 0, 1, 2
PROTECTED_PHASES = frozenset({"flattening", "settling"})
ALERT_ENV = {"discord_webhook": "DISCORD_WEBHOOK_URL", "telegram_token": "TELEGRAM_BOT_TOKEN",
             "telegram_chat_id": "TELEGRAM_CHAT_ID"}
log = logging.getLogger("watchdog")


@dataclass
class WatchdogConfig:
    """Everything the supervisor needs; times in seconds, paths relative to `workdir` unless absolute."""
    symbol: str
    passthrough: list[str] = field(default_factory=list)
    engine_cmd: list[str] = field(default_factory=list)
    workdir: Path = HERE
    log_dir: str = "logs"
    state_dir: str = "state"
    stale_sec: float = 120.0
    grace_sec: float = 60.0
    settle_stale_sec: float = 900.0
    backoff_base: float = 5.0
    backoff_max: float = 300.0
    max_restarts: int = 5
    restart_window: float = 3600.0
    stable_sec: float = 600.0
    poll_sec: float = 1.0

    def command(self) -> list[str]:
        """The engine's argv: `engine_cmd` (default this interpreter + live_trading_v2.py) + --symbol + passthrough."""
        base = self.engine_cmd or [sys.executable, str(HERE / ENGINE_SCRIPT)]
        return [*base, "--symbol", self.symbol, *self.passthrough]

    def path(self, folder: str, name: str) -> Path:
        return self.workdir / folder / name


@dataclass(frozen=True)
class Clock:
    """The watchdog's one source of time (injectable): monotonic for waits, wall for heartbeat ages."""
    mono: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


# ---------------------------------------------------------------------------------------------- heartbeat

@dataclass(frozen=True)
class Heartbeat:
    """One `state/heartbeat_<SYM>.json` as the engine wrote it (DESIGN.md §3)."""
    ts_ms: float
    pid: int | None
    phase: str
    open_positions: Any
    last_stop_check: Any
    model: str
    mode: str


def read_heartbeat(path: Path) -> tuple[Heartbeat | None, str]:
    """Parse the heartbeat file → (heartbeat, "") or (None, why it is unusable; "" when simply absent)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"heartbeat {path} unreadable: {exc}"
    if not isinstance(raw, dict) or not isinstance(raw.get("ts"), (int, float)):
        return None, f"heartbeat {path} has no numeric 'ts' (ms): {str(raw)[:120]}"
    pid = raw.get("pid")
    return Heartbeat(ts_ms=float(raw["ts"]), pid=pid if isinstance(pid, int) else None,
                     phase=str(raw.get("phase", "unknown")), open_positions=raw.get("open_positions"),
                     last_stop_check=raw.get("last_stop_check"), model=str(raw.get("model", "")),
                     mode=str(raw.get("mode", ""))), ""


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_exposure(hb: Heartbeat | None) -> str:
    """The alert's risk line: open positions and when the engine last verified its exchange-side stops."""
    if hb is None:
        return "open positions: unknown (no heartbeat); stops last verified: unknown"
    positions = len(hb.open_positions) if isinstance(hb.open_positions, list) else hb.open_positions
    check = hb.last_stop_check  # ms since the epoch (0 = not yet) or an ISO string
    if isinstance(check, (int, float)) and not isinstance(check, bool):
        check = _utc(check / 1000.0) if check > 0 else None
    return (f"open positions: {positions if positions is not None else 'unknown'}; "
            f"stops last verified: {check or 'never'} (heartbeat of {_utc(hb.ts_ms / 1000.0)}, phase {hb.phase}, "
            f"model {hb.model or 'unknown'})")


class HeartbeatWatch:
    """Tracks heartbeat progress: a heartbeat counts only when its `ts` changes after the engine started."""

    def __init__(self, path: Path, clock: Clock):
        self.path, self.clock = path, clock
        previous, _ = read_heartbeat(path)
        self.last_ts = previous.ts_ms if previous else None
        self.last: Heartbeat | None = None
        self.last_progress = clock.mono()
        self.problem = ""

    def age(self) -> float:
        """Seconds since the last new heartbeat (or since the engine started, before its first)."""
        hb, problem = read_heartbeat(self.path)
        if problem and problem != self.problem:
            log.warning("%s", problem)
        self.problem = problem
        if hb is not None and hb.ts_ms != self.last_ts:
            self.last_ts, self.last, self.last_progress = hb.ts_ms, hb, self.clock.mono()
        return self.clock.mono() - self.last_progress

    @property
    def phase(self) -> str:
        return self.last.phase if self.last else "unknown"


# ---------------------------------------------------------------------------------------------- processes

class Engine:
    """One engine process in its own process group, so a graceful stop reaches it (and only it)."""

    def __init__(self, cmd: list[str], cwd: Path):
        if os.name == "nt":
            self.proc = subprocess.Popen(cmd, cwd=cwd, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        else:
            self.proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        """Graceful stop: SIGTERM to the process group (POSIX) or CTRL_BREAK_EVENT to it (Windows)."""
        try:
            if os.name == "nt":
                os.kill(self.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError) as exc:
            log.info("graceful stop of pid %d: %s (already gone?)", self.pid, exc)

    def kill(self) -> int:
        """Hard kill of the whole process tree; returns the exit code."""
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], capture_output=True, check=False)
            self.proc.kill()
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (POSIX: signal 0; Windows: OpenProcess + exit code)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path: Path) -> tuple[IO[str] | None, str]:
    """Take an OS lock on `path` without waiting (fcntl.flock on POSIX, msvcrt.locking on Windows): the
    watchdog's per symbol, and the live engine's per state file (it imports this stdlib-only function).

    Returns (open lock file to keep for the process lifetime, "") or (None, the holder's pid text).
    The OS releases the lock when the process dies, however it dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = fh.read().strip() or "unknown"
        except OSError:
            holder = "unknown"
        fh.close()
        return None, holder
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, ""


# ---------------------------------------------------------------------------------------------- alerts

class Alerts:
    """Every alert is logged; with alerts configured it also goes to `notifier.py` (imported only then).

    The notifier's library use (its module docstring): `Notifier(NotifierConfig.from_env(discord_webhook=...,
    telegram_token=..., telegram_chat_id=..., telegram_api_url=...))`, `.send(event)` with an event dict
    (`event` = "watchdog", `symbol`, `level`, `message`; queued, never blocking) and `.close(timeout)` to
    flush before exit. The watchdog kind gets no cooldown: a "gave up" alert must not be swallowed by the
    "restarting" one before it. Secrets are never logged.
    """

    def __init__(self, symbol: str, sender: Any = None):
        self.symbol, self.sender = symbol, sender

    @classmethod
    def from_args(cls, symbol: str, ns: argparse.Namespace) -> "Alerts":
        if not (ns.discord_webhook or (ns.telegram_token and ns.telegram_chat_id)):
            return cls(symbol)
        try:
            import notifier
            destinations = {k: getattr(ns, k) for k in (*ALERT_ENV, "telegram_api_url") if getattr(ns, k)}
            sender = notifier.Notifier(notifier.NotifierConfig.from_env(**destinations, cooldowns={"watchdog": 0.0}))
        except ImportError as exc:
            log.warning("alerts are configured but notifier.py cannot be imported (%s): alerts are only logged", exc)
            return cls(symbol)
        except Exception as exc:  # a notifier that fails to start must not stop the supervisor
            log.warning("alerts are configured but notifier.py failed to start (%s): alerts are only logged",
                        type(exc).__name__)
            return cls(symbol)
        log.info("alerts go through notifier.py")
        return cls(symbol, sender)

    def send(self, level: str, title: str, detail: str, hb: Heartbeat | None) -> None:
        """Log and forward one alert; `level` is info|warning|critical."""
        exposure = describe_exposure(hb)
        log.log(logging.INFO if level == "info" else logging.WARNING, "ALERT [%s] %s; %s", level, title, exposure)
        if self.sender is None:
            return
        try:
            self.sender.send({"event": "watchdog", "symbol": self.symbol, "level": level,
                              "message": f"{title}: {detail}; {exposure}"})
        except Exception as exc:  # alerts are best effort; supervision goes on
            log.warning("notifier failed to queue the alert (%s)", type(exc).__name__)

    def close(self, timeout: float = 10.0) -> None:
        if self.sender is not None:
            try:
                self.sender.close(timeout)
            except Exception as exc:
                log.warning("notifier failed to flush (%s)", type(exc).__name__)


# ---------------------------------------------------------------------------------------------- supervisor

class Supervisor:
    """Runs the engine, watches its heartbeat and exit code, decides restarts (see the module docstring)."""

    def __init__(self, cfg: WatchdogConfig, alerts: Alerts, clock: Clock = Clock()):
        self.cfg, self.alerts, self.clock = cfg, alerts, clock
        self.heartbeat_path = cfg.path(cfg.state_dir, f"heartbeat_{cfg.symbol}.json")
        self.journal_path = cfg.path(cfg.log_dir, f"watchdog_{cfg.symbol}.jsonl")
        self.stop_requested = ""
        self.restarts: collections.deque[float] = collections.deque()
        self.consecutive = 0

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        """Signal handler: remember the request; the loops act on it at their next poll."""
        self.stop_requested = signal.Signals(signum).name

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` in poll steps; False when a stop was requested meanwhile."""
        end = self.clock.mono() + seconds
        while not self.stop_requested:
            left = end - self.clock.mono()
            if left <= 0:
                return True
            self.clock.sleep(min(left, self.cfg.poll_sec))
        return False

    def orphan_engine(self) -> str:
        """A fresh heartbeat from a live process we did not start: describe it ("" when there is none)."""
        hb, _ = read_heartbeat(self.heartbeat_path)
        if hb is None or hb.pid is None:
            return ""
        age = self.clock.wall() - hb.ts_ms / 1000.0
        if age > self.cfg.stale_sec or not pid_alive(hb.pid):
            return ""
        return f"pid {hb.pid}, phase {hb.phase}, heartbeat {age:.0f} s old in {self.heartbeat_path}"

    def run(self) -> int:
        """Supervise until a no-restart exit, too many restarts, or a stop request; returns the exit code."""
        orphan = self.orphan_engine()
        if orphan:
            log.error("an engine for %s is already running without this watchdog (%s): stop it first; "
                      "refusing to start a second one", self.cfg.symbol, orphan)
            return EXIT_REFUSED
        while True:
            started = self.clock.mono()
            watch = HeartbeatWatch(self.heartbeat_path, self.clock)
            engine = Engine(self.cfg.command(), self.cfg.workdir)
            log.info("engine started (pid %d)", engine.pid)
            rc, cause = self.watch(engine, watch)
            if cause == "stopped":
                log.info("engine exited with code %d after the watchdog was asked to stop (%s): exiting 0",
                         rc, self.stop_requested)
                return EXIT_CLEAN
            code = self.decide(rc, cause, self.clock.mono() - started)
            if code is not None:
                return code

    def watch(self, engine: Engine, watch: HeartbeatWatch) -> tuple[int, str]:
        """Poll the engine until it exits ("exited"), goes stale ("stale") or we are asked to stop ("stopped")."""
        while True:
            rc = engine.poll()
            if rc is not None:
                return rc, "exited"
            if self.stop_requested:
                return self.stop_engine(engine, watch, f"watchdog received {self.stop_requested}"), "stopped"
            age = watch.age()
            if age > self.cfg.stale_sec:
                detail = (f"no new heartbeat for {age:.1f} s (--stale-sec {self.cfg.stale_sec:g}, "
                          f"phase {watch.phase}): stopping the engine gracefully, then restarting it")
                log.warning("heartbeat stale: %s", detail)
                self.alerts.send("warning", "engine heartbeat stale", detail, watch.last)
                return self.stop_engine(engine, watch, "heartbeat stale"), "stale"
            self.clock.sleep(self.cfg.poll_sec)

    def stop_engine(self, engine: Engine, watch: HeartbeatWatch, why: str) -> int:
        """Graceful stop, then a hard kill after --grace-sec; never while flattening/settling with a live heartbeat.

        Returns the engine's exit code."""
        log.info("%s: graceful stop of engine pid %d (%s)", why, engine.pid,
                 "CTRL_BREAK_EVENT" if os.name == "nt" else "SIGTERM")
        engine.terminate()
        asked = self.clock.mono()
        protected_logged = False
        while (rc := engine.poll()) is None:
            age = watch.age()
            if self.clock.mono() - asked >= self.cfg.grace_sec:
                if watch.phase in PROTECTED_PHASES and age <= self.cfg.settle_stale_sec:
                    if not protected_logged:
                        log.warning("engine pid %d is %s (heartbeat %.1f s old): no hard kill until it finishes "
                                    "or its heartbeat is stale for more than %g s", engine.pid, watch.phase, age,
                                    self.cfg.settle_stale_sec)
                        protected_logged = True
                else:
                    log.warning("killing engine pid %d: still running %.1f s after the graceful stop "
                                "(phase %s, heartbeat %.1f s old)", engine.pid, self.clock.mono() - asked,
                                watch.phase, age)
                    rc = engine.kill()
                    log.warning("engine pid %d killed (exit code %d)", engine.pid, rc)
                    return rc
            self.clock.sleep(self.cfg.poll_sec)
        log.info("engine pid %d stopped (exit code %d)", engine.pid, rc)
        return rc

    def decide(self, rc: int, cause: str, ran: float) -> int | None:
        """Apply the exit-code contract: the watchdog's exit code, or None after waiting out a restart backoff."""
        hb, _ = read_heartbeat(self.heartbeat_path)
        if rc in NO_RESTART:
            detail = f"engine exited with code {rc} ({NO_RESTART[rc]}): not restarting"
            log.error("%s", detail)
            self.record("not_restarted", f"exit {rc}: {NO_RESTART[rc]}", rc, 0.0, hb)
            self.alerts.send("critical", "engine stopped, needs attention", detail, hb)
            return rc
        if rc == 0 and cause == "exited":
            log.info("engine exited with code 0 (clean stop): not restarting")
            self.alerts.send("info", "engine stopped", "engine exited with code 0 (clean stop)", hb)
            return EXIT_CLEAN
        if self.stop_requested:
            log.info("engine exited with code %d; watchdog received %s: not restarting, exiting 0",
                     rc, self.stop_requested)
            return EXIT_CLEAN
        why = "heartbeat stale" if cause == "stale" else RESTART_CAUSES.get(
            rc, f"killed by signal {-rc}" if rc < 0 else "crash")
        now = self.clock.mono()
        while self.restarts and now - self.restarts[0] > self.cfg.restart_window:
            self.restarts.popleft()
        if len(self.restarts) >= self.cfg.max_restarts:
            detail = (f"engine exited with code {rc} ({why}): {len(self.restarts)} restarts in the last "
                      f"{self.cfg.restart_window:g} s (--max-restarts {self.cfg.max_restarts}): giving up")
            log.error("%s", detail)
            self.record("gave_up", f"{why}, exit {rc}: {len(self.restarts)} restarts within "
                                   f"{self.cfg.restart_window:g} s", rc, 0.0, hb)
            self.alerts.send("critical", "engine keeps failing, watchdog gave up", detail, hb)
            return EXIT_GAVE_UP
        if ran >= self.cfg.stable_sec:
            self.consecutive = 0
        delay = min(self.cfg.backoff_base * 2 ** self.consecutive, self.cfg.backoff_max)
        self.consecutive += 1
        self.restarts.append(now)
        detail = (f"engine exited with code {rc} ({why}): restart {len(self.restarts)} of "
                  f"{self.cfg.max_restarts} this hour in {delay:g} s")
        log.warning("%s", detail)
        self.record("restart", why if cause == "stale" or rc < 0 else f"{why}, exit {rc}", rc, delay, hb)
        self.alerts.send("warning", "engine restarting", detail, hb)
        if not self.wait(delay):
            log.info("watchdog received %s during the restart backoff: exiting 0", self.stop_requested)
            return EXIT_CLEAN
        return None

    def record(self, event: str, cause: str, rc: int, delay: float, hb: Heartbeat | None) -> None:
        """Append a decision to `logs/watchdog_<SYM>.jsonl` (what the dashboard shows): `event` restart,
        gave_up (too many restarts) or not_restarted (an exit code that must not be restarted); one JSON line,
        written whole, with the live files' `ts` (ms), `time`, `symbol` and `mode` (the engine's last
        heartbeat's)."""
        now = self.clock.wall()
        record = {"ts": int(now * 1000), "time": _utc(now), "symbol": self.cfg.symbol, "mode": hb.mode if hb else "",
                  "event": event, "cause": cause, "exit_code": rc, "backoff_s": delay,
                  "restart": len(self.restarts), "max_restarts": self.cfg.max_restarts}
        try:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:  # the record is for display; supervision goes on
            log.warning("cannot append to %s: %s", self.journal_path, exc)


# ---------------------------------------------------------------------------------------------- launchers

def launcher_python(checkout: Path) -> str:
    """This checkout's venv interpreter: the running one if it is a venv, else `.venv` in the checkout."""
    if sys.prefix != sys.base_prefix:
        return sys.executable
    venv = checkout / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    return str(venv) if venv.exists() else sys.executable


def _bat_quote(args: list[str]) -> str:
    return subprocess.list2cmdline(args).replace("%", "%%")


def _systemd_quote(arg: str) -> str:
    """One ExecStart word (systemd.service(5) quoting; `%` is a specifier, so doubled)."""
    arg = arg.replace("%", "%%")
    if arg and not re.search(r'[\s"\'\\;$]', arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_launchers(cfg: WatchdogConfig, watchdog_args: list[str], out_dir: Path,
                    checkout: Path = HERE) -> list[Path]:
    """Write `<SYM>_live.bat`, `<SYM>_live.sh` and `purplesky-<SYM>.service`; each runs this watchdog once.

    `watchdog_args` are the watchdog's own flags (secrets excluded); alerts come from the environment
    (DISCORD_WEBHOOK_URL, TELEGRAM_BOT_TOKEN, TELEGRAM_CHAT_ID; the unit reads `<checkout>/.env`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    python, sym = launcher_python(checkout), cfg.symbol
    argv = ["watchdog.py", *watchdog_args, "--", *cfg.passthrough]
    log_file = Path(cfg.log_dir) / f"watchdog_{sym}.log"
    bat = out_dir / f"{sym}_live.bat"
    bat.write_text(
        f"@echo off\r\nrem PurpleSky watchdog for {sym}, written by watchdog.py --write-launchers.\r\n"
        f"rem Runs the watchdog once; the watchdog restarts the engine when that is safe.\r\n"
        f'cd /d "{checkout}"\r\n'
        f"{_bat_quote([python, *argv])}\r\n"
        f"set RC=%ERRORLEVEL%\r\necho watchdog exited with code %RC%, see {log_file}\r\npause\r\nexit /b %RC%\r\n",
        encoding="utf-8")
    sh = out_dir / f"{sym}_live.sh"
    sh.write_text(f"#!/bin/sh\n# PurpleSky watchdog for {sym}, written by watchdog.py --write-launchers.\n"
                  f"cd {shlex.quote(str(checkout))} || exit 2\n"
                  f"exec {shlex.join([python, *argv])}\n", encoding="utf-8")
    sh.chmod(0o755)
    unit = out_dir / f"purplesky-{sym}.service"
    stop_timeout = int(cfg.grace_sec + cfg.settle_stale_sec + 60)
    exec_start = " ".join(_systemd_quote(a) for a in [python, str(checkout / "watchdog.py"), *argv[1:]])
    unit.write_text(
        f"[Unit]\nDescription=PurpleSky live engine watchdog for {sym}\n"
        "After=network-online.target\nWants=network-online.target\n"
        "StartLimitIntervalSec=3600\nStartLimitBurst=3\n\n"
        f"[Service]\nType=simple\nUser={getpass.getuser()}\nWorkingDirectory={checkout}\n"
        f"EnvironmentFile=-{checkout / '.env'}\nExecStart={exec_start}\n"
        "Restart=on-failure\nRestartSec=30\nRestartPreventExitStatus=2 3 4\n"
        f"KillMode=control-group\nTimeoutStopSec={stop_timeout}\n\n"
        "[Install]\nWantedBy=multi-user.target\n", encoding="utf-8")
    return [bat, sh, unit]


# ---------------------------------------------------------------------------------------------- CLI

def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _engine_cmd(text: str) -> list[str]:
    try:
        cmd = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--engine-cmd must be a JSON list of strings: {exc}") from exc
    if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
        raise argparse.ArgumentTypeError("--engine-cmd must be a non-empty JSON list of strings")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    d = WatchdogConfig(symbol="")
    p = argparse.ArgumentParser(prog="watchdog.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --symbol SYM [options] [-- engine args]")
    p.add_argument("--symbol", required=True, help="instrument, passed on to the engine as --symbol")
    p.add_argument("--stale-sec", type=_positive(float), default=d.stale_sec,
                   help="heartbeat age that triggers a graceful stop and restart (s)")
    p.add_argument("--grace-sec", type=_positive(float), default=d.grace_sec,
                   help="wait after the graceful stop before a hard kill (s)")
    p.add_argument("--settle-stale-sec", type=_positive(float), default=d.settle_stale_sec,
                   help="while flattening/settling, hard kill only after the heartbeat is this stale (s)")
    p.add_argument("--backoff-base", type=_positive(float), default=d.backoff_base,
                   help="first restart delay after a crash, doubling per consecutive crash (s)")
    p.add_argument("--backoff-max", type=_positive(float), default=d.backoff_max, help="longest restart delay (s)")
    p.add_argument("--max-restarts", type=_positive(int), default=d.max_restarts,
                   help="restarts allowed per hour; one more crash → alert and exit 1")
    p.add_argument("--restart-window", type=_positive(float), default=d.restart_window, help=argparse.SUPPRESS)
    p.add_argument("--stable-sec", type=_positive(float), default=d.stable_sec,
                   help="a run this long resets the backoff to --backoff-base (s)")
    p.add_argument("--poll-sec", type=_positive(float), default=d.poll_sec, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=d.workdir,
                   help="folder the engine runs in; logs and state live below it (default: this checkout)")
    p.add_argument("--log-dir", default=d.log_dir, help="the engine's live.log_dir, relative to --workdir")
    p.add_argument("--state-dir", default=d.state_dir, help="the engine's live.state_dir, relative to --workdir")
    p.add_argument("--engine-cmd", type=_engine_cmd, default=None, help=argparse.SUPPRESS)
    for dest, env in ALERT_ENV.items():
        p.add_argument("--" + dest.replace("_", "-"), default=os.environ.get(env), help=f"alerts (default ${env})")
    p.add_argument("--telegram-api-url", default=None, help="Telegram API base (tests point it at a stub)")
    p.add_argument("--write-launchers", action="store_true",
                   help="write launchers/<SYM>_live.bat, <SYM>_live.sh and purplesky-<SYM>.service, then exit")
    p.add_argument("--launcher-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split at the first `--`: (watchdog args, engine passthrough args)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def config_from_args(ns: argparse.Namespace, passthrough: list[str]) -> WatchdogConfig:
    names = {f.name for f in fields(WatchdogConfig)} - {"passthrough", "engine_cmd", "workdir"}
    return WatchdogConfig(passthrough=passthrough, engine_cmd=ns.engine_cmd or [],
                          workdir=ns.workdir.resolve(), **{n: getattr(ns, n) for n in names})


def launcher_flags(cfg: WatchdogConfig) -> list[str]:
    """The watchdog flags a launcher repeats: --symbol and every setting off its default (never alert secrets)."""
    default = WatchdogConfig(symbol=cfg.symbol)
    out = ["--symbol", cfg.symbol]
    for f in fields(WatchdogConfig):
        value = getattr(cfg, f.name)
        if f.name in ("symbol", "passthrough") or value == getattr(default, f.name):
            continue
        out += ["--" + f.name.replace("_", "-"), json.dumps(value) if f.name == "engine_cmd" else str(value)]
    return out


def setup_logging(path: Path | None) -> None:
    """stderr plus, given a path, `logs/watchdog_<SYM>.log` (one writer: the lock holder); UTC to the microsecond."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    formatter.formatTime = lambda record, datefmt=None: dt.datetime.fromtimestamp(  # type: ignore[method-assign]
        record.created, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    own, passthrough = split_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(own)
    if not re.fullmatch(r"[A-Z0-9]{2,30}", ns.symbol):
        parser.error(f"--symbol {ns.symbol!r}: expected upper-case letters and digits, e.g. BTCUSDT")
    cfg = config_from_args(ns, passthrough)
    if ns.write_launchers:
        for path in write_launchers(cfg, launcher_flags(cfg), ns.launcher_dir or HERE / "launchers"):
            print(path)
        print("alerts in launchers come from DISCORD_WEBHOOK_URL / TELEGRAM_BOT_TOKEN / TELEGRAM_CHAT_ID "
              "(the systemd unit reads them from .env in the checkout)")
        return EXIT_CLEAN
    if not ns.engine_cmd and not (HERE / ENGINE_SCRIPT).is_file():
        parser.error(f"the engine {HERE / ENGINE_SCRIPT} is missing: run the watchdog from a full checkout")
    lock_path = cfg.path(cfg.state_dir, f"watchdog_{cfg.symbol}.lock")
    lock, holder = acquire_lock(lock_path)
    if lock is None:  # the running watchdog stays the only writer of its log file
        setup_logging(None)
        log.error("another watchdog for %s is running (pid %s, lock %s): refusing to start a second one",
                  cfg.symbol, holder, lock_path)
        return EXIT_REFUSED
    setup_logging(cfg.path(cfg.log_dir, f"watchdog_{cfg.symbol}.log"))
    alerts = Alerts.from_args(cfg.symbol, ns)
    supervisor = Supervisor(cfg, alerts)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None and (name == "SIGTERM" or signal.getsignal(sig) is not signal.SIG_IGN):  # nohup, `&`
            signal.signal(sig, supervisor.request_stop)
    log.info("watchdog for %s started (pid %d)", cfg.symbol, os.getpid())
    try:
        return supervisor.run()
    finally:
        alerts.close()
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
