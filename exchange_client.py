"""Bybit V5 client for the live engine: pybit HTTP + WebSocket with the hardening real money needs.

What it adds on top of pybit 5.17.0:
- one place that picks mainnet / testnet / demo / a local URL (the paper exchange) from config;
- instrument rules and `Decimal` rounding (prices to the tick, quantities DOWN to the step), strings on the wire;
- a deterministic `orderLinkId` per intent, so a create retried after a lost ack can never double an order;
- retries with backoff for transient errors only, and an error taxonomy (`ErrorKind` + exception classes);
- a clock resync and one resend (same orderLinkId) on 10002 for every signed request;
- startup checks (clock offset, instrument, position mode, leverage, API-key permissions);
- keys from `keys.json` profiles or `BYBIT_API_KEY`/`BYBIT_API_SECRET`, never echoed in logs or errors;
- raw-mode WebSockets with guarded callbacks, our own sequence-checked book (`orderbook.OrderBook`), a private
  stream that applies each push once and never lets a late one overwrite newer state, and a watchdog that
  rebuilds connections pybit gave up on.
"""
from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlparse

import orjson
import requests
from pybit import unified_trading
from pybit.exceptions import FailedRequestError, InvalidRequestError

from config import (ConfigError, GlobalConfig, InstrumentConfig, LiveSettings, add_config_args, config_from_args,
                    parse_duration)
import grid
from execution import is_own_order, order_link_id  # noqa: F401  (the lifecycle names its orders; re-exported)
from orderbook import BookStats, OrderBook

log = logging.getLogger("exchange_client")

CATEGORY = "linear"
EXEC_WINDOW_MS = 7 * 86_400_000   # Bybit V5 /v5/execution/list: the widest startTime..endTime window
ENV_KEY, ENV_SECRET = "BYBIT_API_KEY", "BYBIT_API_SECRET"


# ================================================================ error taxonomy
class ErrorKind(enum.Enum):
    """How a caller must react to a failed request."""

    RETRYABLE = "retryable"   # transient: retry later with backoff (already retried by the client)
    BENIGN = "benign"         # the exchange already is in the requested state ("not modified")
    REJECTED = "rejected"     # this request is wrong or not allowed now; fix the request, keep trading
    FATAL = "fatal"           # keys, permissions, IP ban, clock: stop trading until a human looks


class ExchangeError(Exception):
    """A failed exchange request; `kind` tells the caller what to do, `code` is Bybit's retCode."""

    kind = ErrorKind.REJECTED

    def __init__(self, message: str, *, code: int | None = None, http_status: int | None = None,
                 endpoint: str = "", ambiguous: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.endpoint = endpoint
        self.ambiguous = ambiguous      # the request may have been executed although no answer came back
        self.retry_after = retry_after  # seconds the exchange asked us to wait (rate limit reset)


class RetryableError(ExchangeError):
    """Transient failure (timeout, 5xx, server busy); raised only after the retries ran out."""

    kind = ErrorKind.RETRYABLE


class RateLimitError(RetryableError):
    """10006 / HTTP 429: too many requests; `retry_after` holds the wait the exchange asked for."""


class TimestampError(RetryableError):
    """10002: request time outside the receive window (clock drift or a slow network)."""


class BenignError(ExchangeError):
    """The exchange is already in the requested state (34040, 110043, 110025)."""

    kind = ErrorKind.BENIGN


class RejectedError(ExchangeError):
    """The exchange refused this request; retrying it unchanged cannot help."""

    kind = ErrorKind.REJECTED


class InvalidParameterError(RejectedError):
    """10001: a parameter is invalid (qty step, min qty, price tick, position idx...)."""


class MinNotionalError(RejectedError):
    """110094: order value below the instrument's minNotionalValue."""


class InsufficientBalanceError(RejectedError):
    """110004/110007/110012/110044/110045: not enough balance or margin."""


class ReduceOnlyError(RejectedError):
    """110017: a reduce-only order would increase (or there is no) position."""


class OrderNotFoundError(RejectedError):
    """110001/110008/110010: the order is unknown or no longer open."""


class DuplicateOrderError(RejectedError):
    """110072: an order with this orderLinkId already exists."""


class PriceRangeError(RejectedError):
    """110003: price outside the exchange's permissible band."""


class FatalError(ExchangeError):
    """Stop trading: credentials, permissions, bans or configuration are wrong."""

    kind = ErrorKind.FATAL


class AuthenticationError(FatalError):
    """10003/10004/10005/10007/10009/10010/33004: key invalid, bad signature, no permission, IP."""


class StartupCheckError(FatalError):
    """A startup check failed; the client refuses to trade."""


class ClockSkewError(StartupCheckError):
    """The local clock is further from the exchange's than live.max_time_offset allows."""


class KeysError(ValueError):
    """The keys file or environment does not yield usable credentials (names file and profile only)."""


_CODE_CLASSES: dict[int, type[ExchangeError]] = {
    10000: RetryableError, 10016: RetryableError, 10019: RetryableError, 10429: RateLimitError,
    110079: RetryableError, 10006: RateLimitError, 10002: TimestampError,
    34040: BenignError, 110043: BenignError, 110025: BenignError,
    10001: InvalidParameterError, 110094: MinNotionalError, 110017: ReduceOnlyError,
    110004: InsufficientBalanceError, 110007: InsufficientBalanceError, 110012: InsufficientBalanceError,
    110044: InsufficientBalanceError, 110045: InsufficientBalanceError,
    110001: OrderNotFoundError, 110008: OrderNotFoundError, 110010: OrderNotFoundError,
    110072: DuplicateOrderError, 110003: PriceRangeError,
    10003: AuthenticationError, 10004: AuthenticationError, 10005: AuthenticationError,
    10007: AuthenticationError, 10009: AuthenticationError, 10010: AuthenticationError,
    33004: AuthenticationError,
}


def error_class(code: int) -> type[ExchangeError]:
    """Exception class for a Bybit retCode; unknown non-zero codes are plain rejections."""
    return _CODE_CLASSES.get(int(code), RejectedError)


def classify(code: int) -> ErrorKind:
    """The caller's reaction to a Bybit retCode."""
    return error_class(code).kind


def _http_error_class(status: int) -> type[ExchangeError]:
    """Transport-level HTTP status → class: 5xx/429/409(bad body) transient, 401/403/404 fatal."""
    if status == 429:
        return RateLimitError
    if status >= 500 or status == 409:
        return RetryableError
    if status in (401, 403, 404):
        return FatalError
    return RejectedError


# ================================================================ credentials
@dataclass(frozen=True)
class Credentials:
    """API key pair plus where it belongs; the secret is kept out of repr()."""

    api_key: str
    api_secret: str = field(repr=False)
    profile: str = "env"
    source: str = "environment"
    testnet: bool = False
    demo: bool = False
    url: str = ""

    @property
    def masked_key(self) -> str:
        """Key identity safe for logs (first 4 characters)."""
        return (self.api_key[:4] + "…") if len(self.api_key) > 4 else "…"


def load_credentials(keys_file: str | Path | None, profile: str,
                     env: Mapping[str, str] | None = None) -> Credentials:
    """Keys from a keys.json profile, else (file absent) from BYBIT_API_KEY/BYBIT_API_SECRET."""
    env = os.environ if env is None else env
    path = Path(keys_file) if keys_file else None
    if path is not None and path.exists():
        return _profile_from_file(path, profile)
    if env.get(ENV_KEY) and env.get(ENV_SECRET):
        return Credentials(api_key=env[ENV_KEY], api_secret=env[ENV_SECRET])
    where = f"keys file {path} does not exist and " if path is not None else ""
    raise KeysError(f"no API keys: {where}{ENV_KEY}/{ENV_SECRET} are not set "
                    f"(copy keys.json.example to keys.json and fill profile {profile!r})")


def _profile_from_file(path: Path, profile: str) -> Credentials:
    """Read and validate one profile; errors name the file and profile, never a value."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysError(f"keys file {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "encoding"
        raise KeysError(f"keys file {path}: invalid JSON at {where}") from None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict):
        raise KeysError(f'keys file {path}: expected {{"profiles": {{name: {{"api_key", "api_secret"}}}}}}')
    if profile not in profiles:
        raise KeysError(f"keys file {path}: unknown profile {profile!r} "
                        f"(profiles: {', '.join(sorted(map(str, profiles))) or 'none'})")
    entry = profiles[profile]
    if not isinstance(entry, dict):
        raise KeysError(f"keys file {path}, profile {profile!r}: expected an object")
    for name in ("api_key", "api_secret"):
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            raise KeysError(f"keys file {path}, profile {profile!r}: field {name!r} is missing or empty")
    for name in ("testnet", "demo"):
        if name in entry and not isinstance(entry[name], bool):
            raise KeysError(f"keys file {path}, profile {profile!r}: field {name!r} must be true or false")
    url = entry.get("url", "")
    if not isinstance(url, str) or (url and not re.match(r"https?://", url)):
        raise KeysError(f"keys file {path}, profile {profile!r}: field 'url' must be an http(s):// URL")
    return Credentials(api_key=entry["api_key"].strip(), api_secret=entry["api_secret"].strip(),
                       profile=profile, source=str(path), testnet=bool(entry.get("testnet", False)),
                       demo=bool(entry.get("demo", False)), url=url.rstrip("/"))


# ================================================================ endpoints
@dataclass(frozen=True)
class Endpoints:
    """Where REST and WS go: a local/base URL override, or pybit's own testnet/demo/mainnet hosts."""

    rest_url: str = ""     # "" = pybit's host for testnet/demo/mainnet
    ws_url: str = ""       # ws(s)://host:port without path; "" = pybit's host
    testnet: bool = False
    demo: bool = False

    @property
    def name(self) -> str:
        """Human label for logs."""
        if self.rest_url:
            return self.rest_url
        return ("demo-" if self.demo else "") + ("testnet" if self.testnet else "mainnet")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def resolve_endpoints(live: LiveSettings, creds: Credentials | None) -> Endpoints:
    """Config URL overrides win, then the key profile's url; paper mode needs a URL."""
    rest = (live.rest_url or (creds.url if creds else "")).rstrip("/")
    ws = live.ws_url.rstrip("/") if live.ws_url else (re.sub(r"^http", "ws", rest) if rest else "")
    if live.mode == "paper" and not rest:
        raise FatalError("live.mode = 'paper' needs live.rest_url or a key profile with a 'url' "
                         "(the paper exchange, e.g. http://127.0.0.1:8765)")
    testnet = live.mode == "testnet" or bool(creds and creds.testnet)
    if live.mode == "live" and testnet:
        raise FatalError("live.mode = 'live' with a testnet key profile: pick one")
    return Endpoints(rest_url=rest, ws_url=ws, testnet=testnet, demo=live.demo or bool(creds and creds.demo))


# ================================================================ instrument rules
def _dec(value: Any, name: str = "value") -> Decimal:
    """Exact Decimal of a float/str/int/Decimal (floats via their shortest repr)."""
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise ValueError(f"{name} = {value!r} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"{name} = {value!r} is not finite")
    return d


def wire(d: Decimal) -> str:
    """Plain decimal string for the wire (never exponent notation)."""
    return format(d, "f")


@dataclass(frozen=True)
class InstrumentRules:
    """Trading rules of one linear contract, as Decimals."""

    symbol: str
    tick_size: Decimal
    qty_step: Decimal
    min_qty: Decimal
    min_notional: Decimal
    max_qty: Decimal | None = None
    max_market_qty: Decimal | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    status: str = "Trading"

    def __post_init__(self) -> None:
        for name in ("tick_size", "qty_step", "min_qty"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.symbol}: {name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_bybit(cls, item: Mapping[str, Any]) -> "InstrumentRules":
        """Rules from one /v5/market/instruments-info list item."""
        price, lot = item["priceFilter"], item["lotSizeFilter"]

        def opt(section: Mapping[str, Any], key: str) -> Decimal | None:
            return _dec(section[key], key) if section.get(key) not in (None, "") else None
        return cls(symbol=item["symbol"], tick_size=_dec(price["tickSize"], "tickSize"),
                   qty_step=_dec(lot["qtyStep"], "qtyStep"), min_qty=_dec(lot["minOrderQty"], "minOrderQty"),
                   min_notional=_dec(lot.get("minNotionalValue") or "0", "minNotionalValue"),
                   max_qty=opt(lot, "maxOrderQty"), max_market_qty=opt(lot, "maxMktOrderQty"),
                   min_price=opt(price, "minPrice"), max_price=opt(price, "maxPrice"),
                   status=str(item.get("status", "Trading")))

    @classmethod
    def from_config(cls, symbol: str, inst: InstrumentConfig) -> "InstrumentRules":
        """Rules from the config (dry-run, before the exchange answered)."""
        return cls(symbol=symbol, tick_size=_dec(inst.tick_size), qty_step=_dec(inst.qty_step),
                   min_qty=_dec(inst.min_qty), min_notional=_dec(inst.min_notional))

    def round_price(self, price: Any, direction: int = grid.NEAREST) -> Decimal:
        """Price on the tick grid by the one rule (grid.snap_round_dec; nearest by default, -1 down, +1 up)."""
        out = grid.snap_round_dec(_dec(price, "price"), self.tick_size, direction)
        if out <= 0:
            raise InvalidParameterError(f"{self.symbol}: price {price} rounds to {wire(out)} (tick "
                                        f"{wire(self.tick_size)})", code=10001)
        return out

    def passive_price(self, price: Any, side: str) -> Decimal:
        """Tick price on the passive side: buys round down, sells up (a maker order never crosses by rounding)."""
        return self.round_price(price, grid.DOWN if _side(side) == "Buy" else grid.UP)

    def round_qty(self, qty: Any) -> Decimal:
        """Quantity rounded DOWN to the step (grid.snap_round_dec): rounding never increases risk."""
        return grid.snap_round_dec(_dec(qty, "qty"), self.qty_step, grid.DOWN)

    def check_order(self, qty: Decimal, price: Decimal | None, *, reduce_only: bool = False,
                    market: bool = False) -> None:
        """Raise the exception the exchange would (10001 / 110094) before wasting a request."""
        if qty < self.min_qty:
            raise InvalidParameterError(f"{self.symbol}: qty {wire(qty)} below minOrderQty "
                                        f"{wire(self.min_qty)}", code=10001)
        limit = self.max_market_qty if market else self.max_qty
        if limit is not None and qty > limit and not reduce_only:
            raise InvalidParameterError(f"{self.symbol}: qty {wire(qty)} above max {wire(limit)}", code=10001)
        if price is not None and not reduce_only and qty * price < self.min_notional:
            raise MinNotionalError(f"{self.symbol}: order value {wire(qty * price)} below minNotionalValue "
                                   f"{wire(self.min_notional)}", code=110094)


def _side(side: str) -> str:
    """Normalise a side to Bybit's 'Buy'/'Sell'."""
    s = str(side).capitalize()
    if s not in ("Buy", "Sell"):
        raise ValueError(f"side must be Buy or Sell, got {side!r}")
    return s


# ================================================================ records
@dataclass(frozen=True)
class OrderAck:
    """Result of a create: ids, and whether it was recovered after a lost ack / duplicate."""

    order_id: str
    order_link_id: str
    recovered: bool = False


@dataclass(frozen=True)
class KeyPermissions:
    """The API key's permissions from /v5/user/query-api."""

    read_only: bool
    permissions: dict
    ips: tuple

    @classmethod
    def from_bybit(cls, result: Mapping[str, Any]) -> "KeyPermissions":
        """Parse a query-api result."""
        perms = result.get("permissions") or {}
        return cls(read_only=bool(int(result.get("readOnly", 0) or 0)),
                   permissions={str(k): [str(x) for x in (v or [])] for k, v in perms.items()},
                   ips=tuple(result.get("ips") or ()))

    def unsafe_reasons(self) -> list[str]:
        """Why this key must not run an unattended bot: it can move funds out (withdraw or transfer)."""
        reasons = []
        for group, items in self.permissions.items():
            for item in items:
                if "withdraw" in item.lower() or ("transfer" in item.lower() and group.lower() == "wallet"):
                    reasons.append(f"{group}:{item}")
        return reasons

    @property
    def can_trade(self) -> bool:
        """Whether the key may place derivatives orders."""
        granted = {x for k in ("ContractTrade", "Derivatives") for x in self.permissions.get(k, [])}
        return not self.read_only and bool(granted & {"Order", "DerivativesTrade"})


@dataclass(frozen=True)
class StartupReport:
    """What the startup checks found."""

    time_offset_ms: float
    rules: InstrumentRules
    permissions: KeyPermissions | None
    position_mode: str
    leverage: float | None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors."""

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_rate_limit_wait: float = 30.0

    def delay(self, attempt: int, err: ExchangeError) -> float:
        """Seconds to wait before attempt `attempt + 1`; a rate limit waits for its reset time."""
        if err.retry_after is not None:
            return min(max(err.retry_after, 0.0), self.max_rate_limit_wait)
        return min(self.base_delay * (2 ** (attempt - 1)), self.max_delay)


# ================================================================ REST client
class _Redactor:
    """Removes a secret from any text that leaves the client (exception messages, logs)."""

    def __init__(self, *secrets: str) -> None:
        self._secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


class _SyncedHTTP(unified_trading.HTTP):
    """pybit HTTP that signs with the exchange's clock (local time + measured offset), not the raw local one."""

    time_offset_ms: float = 0.0

    def _prepare_headers(self, payload: str, recv_window: int,
                         content_type: str = "application/json") -> dict[str, str]:
        timestamp = int(time.time() * 1000 + self.time_offset_ms)
        signature = self._auth(payload=payload, recv_window=recv_window, timestamp=timestamp)
        return {"Content-Type": content_type, "X-BAPI-API-KEY": self.api_key, "X-BAPI-SIGN": signature,
                "X-BAPI-SIGN-TYPE": "2", "X-BAPI-TIMESTAMP": str(timestamp), "X-BAPI-RECV-WINDOW": str(recv_window)}


class ExchangeClient:
    """Bybit V5 REST (pybit HTTP) with rounding, idempotent orders, taxonomy and retries; makes the WS streams."""

    def __init__(self, cfg: GlobalConfig, credentials: Credentials | None = None, *,
                 retry: RetryPolicy | None = None) -> None:
        self.cfg = cfg
        self.symbol = cfg.symbol
        self.creds = credentials
        self.endpoints = resolve_endpoints(cfg.live, credentials)
        self.retry = retry or RetryPolicy(max_attempts=cfg.live.max_retries)
        self._redact = _Redactor(credentials.api_secret if credentials else "")
        self.rules: InstrumentRules | None = None
        self.time_offset_ms = 0.0
        self.error_counts: Counter[str] = Counter()
        self.http = self._make_http()
        log.info("exchange client for %s on %s (key %s)", self.symbol, self.endpoints.name,
                 credentials.masked_key if credentials else "none")

    @classmethod
    def from_config(cls, cfg: GlobalConfig, env: Mapping[str, str] | None = None) -> "ExchangeClient":
        """Client with the keys cfg.live names (keys-file profile or environment); dry-run needs none."""
        live = cfg.live
        creds = None if live.mode == "dry-run" else load_credentials(live.keys_file, live.keys_profile, env)
        return cls(cfg, creds)

    def _make_http(self) -> _SyncedHTTP:
        """pybit session with its own retries off: this client retries by taxonomy."""
        kwargs: dict[str, Any] = dict(testnet=self.endpoints.testnet, demo=self.endpoints.demo,
                                      timeout=parse_duration(self.cfg.live.request_timeout),
                                      max_retries=1, force_retry=False, retry_codes={-1}, recv_window=5000)
        if self.creds is not None:
            kwargs.update(api_key=self.creds.api_key, api_secret=self.creds.api_secret)
        session = _SyncedHTTP(**kwargs)
        if self.endpoints.rest_url:
            session.endpoint = self.endpoints.rest_url
        if urlparse(session.endpoint).hostname in LOOPBACK_HOSTS:
            session.client.trust_env = False   # no HTTP(S)_PROXY for our own 127.0.0.1 exchange (nor an environ scan per call)
        return session

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self.http.client.close()

    # ------------------------------------------------------------ low level
    def request(self, method: str, params: Mapping[str, Any] | None = None, *, retry: bool = True) -> dict:
        """Call a pybit HTTP method: a 10002 resyncs the clock and resends once (`_send_synced`); other
        transient failures retry with backoff when `retry`; failures raise the taxonomy's class."""
        attempts = self.retry.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return self._send_synced(method, params)
            except ExchangeError as err:
                if err.kind is not ErrorKind.RETRYABLE or attempt == attempts:
                    raise
                wait = self.retry.delay(attempt, err)
                log.warning("%s failed (%s); retry %d/%d in %.2fs", method, err, attempt, attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _send_synced(self, method: str, params: Mapping[str, Any] | None) -> dict:
        """`_send`; on 10002 (request time outside the receive window) measure the clock offset and resend the
        same params once, at once: a 10002 is refused before matching, so the same orderLinkId cannot double
        an order. Raises ClockSkewError, without resending, when the offset exceeds live.max_time_offset."""
        try:
            return self._send(method, params)
        except TimestampError as err:
            offset = self.sync_clock()
            log.warning("%s: %s; clock resynced (offset %+.0f ms), resending once", method, err, offset)
        return self._send(method, params)

    def _send(self, method: str, params: Mapping[str, Any] | None) -> dict:
        """One pybit call; a failure is counted in `error_counts` and raised as the taxonomy's class."""
        try:
            return getattr(self.http, method)(**dict(params or {}))
        except (InvalidRequestError, FailedRequestError, requests.exceptions.RequestException) as exc:
            err = self._translate(exc, method)
        self.error_counts[type(err).__name__] += 1
        raise err

    def _translate(self, exc: Exception, endpoint: str) -> ExchangeError:
        """Map a pybit/requests exception to the taxonomy, with secrets removed from the text."""
        if isinstance(exc, InvalidRequestError):
            code = int(exc.status_code)
            cls = error_class(code)
            retry_after = _reset_wait(exc.resp_headers) if cls is RateLimitError else None
            return cls(self._redact(f"{endpoint}: retCode {code}: {exc.message}"), code=code,
                       endpoint=endpoint, retry_after=retry_after,
                       ambiguous=cls is RetryableError)
        if isinstance(exc, FailedRequestError):
            status = int(exc.status_code)
            cls = _http_error_class(status)
            retry_after = _reset_wait(exc.resp_headers) if cls is RateLimitError else None
            return cls(self._redact(f"{endpoint}: HTTP {status}: {exc.message}"), http_status=status,
                       endpoint=endpoint, retry_after=retry_after, ambiguous=status >= 500 or status == 409)
        kind = type(exc).__name__
        never_sent = isinstance(exc, requests.exceptions.ConnectTimeout)
        return RetryableError(self._redact(f"{endpoint}: transport error {kind}"), endpoint=endpoint,
                              ambiguous=not never_sent)

    # ------------------------------------------------------------ market / account
    def server_time_offset(self) -> float:
        """Exchange clock minus local clock in ms (half the round trip corrected)."""
        t0 = time.time()
        env = self.request("get_server_time")
        t1 = time.time()
        result = env.get("result") or {}
        server_s = (int(result["timeNano"]) / 1e9 if result.get("timeNano") else float(result["timeSecond"]))
        return (server_s - (t0 + t1) / 2.0) * 1000.0

    def sync_clock(self) -> float:
        """Measure the clock offset and sign with it; refuse (ClockSkewError) above live.max_time_offset."""
        offset = self.server_time_offset()
        limit_ms = parse_duration(self.cfg.live.max_time_offset) * 1000.0
        if abs(offset) > limit_ms:
            raise ClockSkewError(f"clock offset to {self.endpoints.name} is {offset:+.0f} ms, above "
                                 f"live.max_time_offset {self.cfg.live.max_time_offset}: sync the system clock")
        self.time_offset_ms = self.http.time_offset_ms = offset
        return offset

    def load_instrument(self) -> InstrumentRules:
        """Fetch and keep the symbol's trading rules."""
        try:
            env = self.request("get_instruments_info", {"category": CATEGORY, "symbol": self.symbol})
        except InvalidParameterError as err:   # an unknown symbol can be answered as a parameter error
            raise StartupCheckError(f"instrument {self.symbol} not found on {self.endpoints.name} ({err})") from None
        items = (env.get("result") or {}).get("list") or []
        match = [it for it in items if it.get("symbol") == self.symbol]
        if not match:
            raise StartupCheckError(f"instrument {self.symbol} not found on {self.endpoints.name}")
        self.rules = InstrumentRules.from_bybit(match[0])
        return self.rules

    def key_permissions(self) -> KeyPermissions:
        """The API key's permissions."""
        return KeyPermissions.from_bybit(self.request("get_api_key_information").get("result") or {})

    def wallet(self, coin: str = "USDT") -> dict:
        """Unified account summary: equity, available balance, unrealised PnL (floats)."""
        env = self.request("get_wallet_balance", {"accountType": "UNIFIED", "coin": coin})
        row = ((env.get("result") or {}).get("list") or [{}])[0]

        def num(key: str) -> float:
            value = row.get(key)
            return float(value) if value not in (None, "") else float("nan")
        return {"equity": num("totalEquity"), "available": num("totalAvailableBalance"),
                "wallet_balance": num("totalWalletBalance"), "upnl": num("totalPerpUPL")}

    def positions(self) -> list[dict]:
        """Position rows for the symbol (raw Bybit dicts; a flat row has size '0')."""
        env = self.request("get_positions", {"category": CATEGORY, "symbol": self.symbol})
        return list((env.get("result") or {}).get("list") or [])

    def open_orders(self) -> list[dict]:
        """Open orders for the symbol (raw Bybit dicts)."""
        return self._paged("get_open_orders", {"category": CATEGORY, "symbol": self.symbol, "limit": 50})

    def executions(self, since_ms: int, now_ms: int) -> list[dict]:
        """Executions (raw Bybit dicts) from `since_ms` to `now_ms`, every page, in windows of at most 7 days:
        Bybit V5 /v5/execution/list answers [startTime, startTime + 7 days] for a startTime alone and refuses
        a wider startTime..endTime, so one query from before a longer downtime would miss the newest fills.
        since_ms <= 0 (never read before): the last window only."""
        start = since_ms if since_ms > 0 else now_ms - EXEC_WINDOW_MS
        rows: list[dict] = []
        while True:
            rows += self._paged("get_executions", {"category": CATEGORY, "symbol": self.symbol,
                                                   "startTime": start, "endTime": start + EXEC_WINDOW_MS,
                                                   "limit": 100})
            start += EXEC_WINDOW_MS
            if start > now_ms:
                return rows

    def _paged(self, method: str, params: dict) -> list[dict]:
        """All pages of a cursor-paginated list endpoint."""
        rows: list[dict] = []
        cursor = ""
        while True:
            query = dict(params, cursor=cursor) if cursor else dict(params)
            result = self.request(method, query).get("result") or {}
            rows.extend(result.get("list") or [])
            cursor = result.get("nextPageCursor") or ""
            if not cursor or not result.get("list"):
                return rows

    def find_order(self, link_id: str) -> dict | None:
        """An order by orderLinkId, open or recently closed; None if the exchange has never seen it."""
        for method, extra in (("get_open_orders", {}), ("get_open_orders", {"openOnly": 1}),
                              ("get_order_history", {})):
            params = {"category": CATEGORY, "symbol": self.symbol, "orderLinkId": link_id, **extra}
            try:
                rows = (self.request(method, params).get("result") or {}).get("list") or []
            except RejectedError as exc:
                log.debug("find_order via %s unavailable: %s", method, exc)
                continue
            for row in rows:
                if row.get("orderLinkId") == link_id:
                    return row
        return None

    # ------------------------------------------------------------ orders
    def _rules(self) -> InstrumentRules:
        if self.rules is None:
            raise StartupCheckError("instrument rules not loaded: call startup_checks() or load_instrument()")
        return self.rules

    def position_idx(self, side: str, reduce_only: bool) -> int:
        """0 in one-way mode; in hedge mode 1 for the long leg and 2 for the short leg."""
        if self.cfg.live.position_mode == "oneway":
            return 0
        opens_long = (_side(side) == "Buy") != reduce_only
        return 1 if opens_long else 2

    def place_order(self, intent: str, side: str, qty: Any, *, price: Any = None, order_type: str = "Limit",
                    time_in_force: str | None = None, reduce_only: bool = False,
                    take_profit: Any = None, stop_loss: Any = None, tpsl_mode: str | None = None,
                    tp_limit_price: Any = None, sl_limit_price: Any = None,
                    trigger_price: Any = None, trigger_direction: int | None = None,
                    trigger_by: str = "LastPrice") -> OrderAck:
        """Create an order idempotently: the intent's orderLinkId makes a retried create land at most once.

        Prices go to the tick (PostOnly: on the passive side), quantities DOWN to the step; local rule
        violations raise the exchange's classes before sending. A RetryableError with `ambiguous=True`
        means the outcome stayed unknown: calling again with the same intent is safe.
        """
        if order_type not in ("Limit", "Market"):
            raise ValueError(f"order_type must be Limit or Market, got {order_type!r}")
        rules = self._rules()
        side = _side(side)
        link = order_link_id(intent)
        is_market = order_type == "Market"
        qty_d = rules.round_qty(qty)
        params: dict[str, Any] = {"category": CATEGORY, "symbol": self.symbol, "side": side,
                                  "orderType": order_type, "qty": wire(qty_d), "orderLinkId": link,
                                  "positionIdx": self.position_idx(side, reduce_only)}
        price_d = None
        if not is_market:
            if price is None:
                raise ValueError("a Limit order needs a price")
            tif = time_in_force or "GTC"
            price_d = rules.passive_price(price, side) if tif == "PostOnly" else rules.round_price(price)
            params.update(price=wire(price_d), timeInForce=tif)
        elif time_in_force:
            params["timeInForce"] = time_in_force
        rules.check_order(qty_d, price_d, reduce_only=reduce_only, market=is_market)
        if reduce_only:
            params["reduceOnly"] = True
        self._add_tpsl(params, rules, take_profit, stop_loss, tpsl_mode, tp_limit_price, sl_limit_price)
        if trigger_price is not None:
            if trigger_direction not in (1, 2):
                raise ValueError("a conditional order needs trigger_direction 1 (rise) or 2 (fall)")
            params.update(triggerPrice=wire(rules.round_price(trigger_price)), triggerDirection=trigger_direction,
                          triggerBy=trigger_by)
        return self._create(params)

    @staticmethod
    def _add_tpsl(params: dict, rules: InstrumentRules, take_profit: Any, stop_loss: Any, tpsl_mode: str | None,
                  tp_limit_price: Any, sl_limit_price: Any) -> None:
        """Attach TP/SL: Full mode uses market exits; Partial allows limit (maker) exits."""
        if take_profit is None and stop_loss is None:
            return
        params["tpslMode"] = tpsl_mode or ("Partial" if tp_limit_price is not None or sl_limit_price is not None
                                           else "Full")
        if take_profit is not None:
            params["takeProfit"] = wire(rules.round_price(take_profit))
            params["tpTriggerBy"] = "LastPrice"
            if tp_limit_price is not None:
                params.update(tpOrderType="Limit", tpLimitPrice=wire(rules.round_price(tp_limit_price)))
        if stop_loss is not None:
            params["stopLoss"] = wire(rules.round_price(stop_loss))
            params["slTriggerBy"] = "LastPrice"
            if sl_limit_price is not None:
                params.update(slOrderType="Limit", slLimitPrice=wire(rules.round_price(sl_limit_price)))

    def _create(self, params: dict) -> OrderAck:
        """Send a create; after an ambiguous failure look the order up by orderLinkId before resending."""
        link = params["orderLinkId"]
        attempts = self.retry.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                result = self.request("place_order", params, retry=False).get("result") or {}
                return OrderAck(order_id=str(result.get("orderId", "")), order_link_id=link)
            except DuplicateOrderError:
                found = self.find_order(link)
                if found is None:
                    raise
                log.info("create %s: duplicate orderLinkId, already placed as %s", link, found.get("orderId"))
                return OrderAck(order_id=str(found.get("orderId", "")), order_link_id=link, recovered=True)
            except ExchangeError as err:
                if err.ambiguous:
                    found = self._lookup_quietly(link)
                    if found is not None:
                        log.warning("create %s: ack lost (%s) but the order exists as %s", link, err,
                                    found.get("orderId"))
                        return OrderAck(order_id=str(found.get("orderId", "")), order_link_id=link,
                                        recovered=True)
                if err.kind is not ErrorKind.RETRYABLE or attempt == attempts:
                    raise
                wait = self.retry.delay(attempt, err)
                log.warning("create %s failed (%s); resend %d/%d in %.2fs", link, err, attempt, attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _lookup_quietly(self, link: str) -> dict | None:
        """find_order that treats a failing lookup as 'unknown' (the resend is still safe: 110072)."""
        try:
            return self.find_order(link)
        except ExchangeError as exc:
            log.warning("lookup of %s failed: %s", link, exc)
            return None

    def amend_order(self, *, order_link_id: str | None = None, order_id: str | None = None, price: Any = None,
                    qty: Any = None, take_profit: Any = None, stop_loss: Any = None) -> None:
        """Amend price/qty/TP/SL of an open order (values rounded to the rules; '0' clears TP/SL)."""
        rules = self._rules()
        params = self._order_ref(order_link_id, order_id)
        if price is not None:
            params["price"] = wire(rules.round_price(price))
        if qty is not None:
            params["qty"] = wire(rules.round_qty(qty))
        for key, value in (("takeProfit", take_profit), ("stopLoss", stop_loss)):
            if value is not None:
                params[key] = "0" if _dec(value) == 0 else wire(rules.round_price(value))
        self.request("amend_order", params)

    def cancel_order(self, *, order_link_id: str | None = None, order_id: str | None = None) -> None:
        """Cancel one order; raises OrderNotFoundError when it is already gone (filled or cancelled)."""
        params = self._order_ref(order_link_id, order_id)
        unanswered = False
        attempts = self.retry.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.request("cancel_order", params, retry=False)
                return
            except OrderNotFoundError:
                if unanswered:
                    log.info("cancel %s: gone after an unanswered attempt, treating as cancelled", params)
                    return
                raise
            except RetryableError as err:
                unanswered = unanswered or err.ambiguous
                if attempt == attempts:
                    raise
                time.sleep(self.retry.delay(attempt, err))

    def cancel_all(self) -> list[str]:
        """Cancel every open order of the symbol; returns the cancelled orderIds."""
        env = self.request("cancel_all_orders", {"category": CATEGORY, "symbol": self.symbol})
        return [str(r.get("orderId")) for r in (env.get("result") or {}).get("list") or []]

    def _order_ref(self, order_link_id: str | None, order_id: str | None) -> dict:
        if not (order_link_id or order_id):
            raise ValueError("order_link_id or order_id is required")
        ref: dict[str, Any] = {"category": CATEGORY, "symbol": self.symbol}
        if order_id:
            ref["orderId"] = order_id
        else:
            ref["orderLinkId"] = order_link_id
        return ref

    def set_trading_stop(self, *, side: str, take_profit: Any = None, stop_loss: Any = None,
                         tpsl_mode: str = "Full", size: Any = None) -> bool:
        """Set or clear ('0') position TP/SL; returns False when nothing changed (34040)."""
        rules = self._rules()
        params: dict[str, Any] = {"category": CATEGORY, "symbol": self.symbol, "tpslMode": tpsl_mode,
                                  "positionIdx": self.position_idx(side, reduce_only=False)}
        for key, value in (("takeProfit", take_profit), ("stopLoss", stop_loss)):
            if value is not None:
                params[key] = "0" if _dec(value) == 0 else wire(rules.round_price(value))
        if size is not None:
            params["tpSize"] = params["slSize"] = wire(rules.round_qty(size))
        try:
            self.request("set_trading_stop", params)
        except BenignError:
            return False
        return True

    def set_leverage(self, leverage: float) -> bool:
        """Set buy and sell leverage; returns False when it already was (110043)."""
        value = wire(_dec(leverage).normalize())
        try:
            self.request("set_leverage", {"category": CATEGORY, "symbol": self.symbol,
                                          "buyLeverage": value, "sellLeverage": value})
        except BenignError:
            return False
        return True

    def set_position_mode(self, mode: str) -> bool:
        """Switch one-way/hedge; returns False when already in that mode (110025)."""
        code = {"oneway": 0, "hedge": 3}[mode]
        try:
            self.request("switch_position_mode", {"category": CATEGORY, "symbol": self.symbol, "mode": code})
        except BenignError:
            return False
        return True

    # ------------------------------------------------------------ startup
    def startup_checks(self, *, trading: bool = True) -> StartupReport:
        """Refuse to trade on a skewed clock, unknown instrument, wrong mode or a key that can move funds."""
        live = self.cfg.live
        offset = self.sync_clock()
        rules = self.load_instrument()
        if rules.status != "Trading":
            raise StartupCheckError(f"{self.symbol} status is {rules.status!r}, not Trading")
        perms = None
        leverage = None
        if trading:
            if self.creds is None:
                raise StartupCheckError("trading needs API keys")
            perms = self.key_permissions()
            unsafe = perms.unsafe_reasons()
            if unsafe:
                raise StartupCheckError(f"API key {self.creds.masked_key} can move funds ({', '.join(unsafe)}): "
                                        "create a trade-only key without Withdraw/Transfer permissions")
            if not perms.can_trade:
                raise StartupCheckError(f"API key {self.creds.masked_key} cannot place contract orders "
                                        "(read-only or no ContractTrade:Order permission)")
            if "*" in perms.ips or not perms.ips:
                log.warning("API key %s has no IP whitelist", self.creds.masked_key)
            self._ensure_position_mode(live.position_mode)
            if live.leverage > 0:
                self.set_leverage(live.leverage)
                leverage = live.leverage
        log.info("startup checks passed: offset %+.0f ms, tick %s, step %s, min qty %s, min notional %s",
                 offset, wire(rules.tick_size), wire(rules.qty_step), wire(rules.min_qty), wire(rules.min_notional))
        return StartupReport(time_offset_ms=offset, rules=rules, permissions=perms,
                             position_mode=live.position_mode, leverage=leverage)

    def _ensure_position_mode(self, mode: str) -> None:
        """Switch to the configured mode; if refused (open positions), accept only if rows already match."""
        try:
            self.set_position_mode(mode)
            return
        except RejectedError as exc:
            refusal = exc
        indices = {int(p.get("positionIdx", 0)) for p in self.positions()}
        expected = {0} if mode == "oneway" else {1, 2}
        if not indices or not indices <= expected:
            raise StartupCheckError(f"cannot switch to {mode} mode ({refusal}) and positions use "
                                    f"positionIdx {sorted(indices)}")

    # ------------------------------------------------------------ streams
    def market_stream(self, **kwargs: Any) -> "MarketStream":
        """Public stream (book + trades + optional kline) for the client's symbol."""
        kwargs.setdefault("stale_after", parse_duration(self.cfg.live.ws_stale_after))
        return MarketStream(self.endpoints, self.symbol, **kwargs)

    def private_stream(self, **kwargs: Any) -> "PrivateStream":
        """Authenticated stream of order/execution/position/wallet pushes."""
        if self.creds is None:
            raise FatalError("the private stream needs API keys")
        kwargs.setdefault("stale_after", parse_duration(self.cfg.live.ws_stale_after))
        return PrivateStream(self.endpoints, self.creds, **kwargs)


def _reset_wait(headers: Mapping[str, str] | None) -> float | None:
    """Seconds until X-Bapi-Limit-Reset-Timestamp (never negative; None if absent)."""
    if not headers:
        return None
    raw = headers.get("X-Bapi-Limit-Reset-Timestamp")
    try:
        return max(0.0, int(raw) / 1000.0 - time.time()) if raw is not None else None
    except (TypeError, ValueError):
        return None


# ================================================================ WebSocket
class _GuardedWebSocket(unified_trading.WebSocket):
    """pybit WebSocket in raw mode that reaches a base URL, survives bad frames and reports liveness."""

    def __init__(self, owner: "_Stream", generation: int, base_url: str, **kwargs: Any) -> None:
        self._owner = owner
        self._generation = generation
        self._base_url = base_url
        super().__init__(callback_function=self._deliver, **kwargs)

    def _connect(self, url: str) -> None:
        if self._base_url and url.startswith("wss://{SUBDOMAIN}"):
            url = self._base_url + url[url.index("/v5/"):]
        super()._connect(url)
        self._skip_duplicate_utf8_check()

    def _skip_duplicate_utf8_check(self) -> None:
        """websocket-client checks each text frame's UTF-8 byte by byte in Python (160 us for a 400-byte book
        delta: 21 ms of every 1m bar in a replay) unless run_forever is given skip_utf8_validation, which pybit
        does not pass. The frame is decoded strictly right after (bytes.decode: UnicodeDecodeError on a bad
        byte), so that loop only repeats a check; it is switched off on the connected socket."""
        sock = getattr(getattr(self, "ws", None), "sock", None)
        for reader in (getattr(sock, "frame_buffer", None), getattr(sock, "cont_frame", None)):
            if reader is not None:
                reader.skip_utf8_validation = True

    def _reset(self) -> None:
        super()._reset()
        owner = getattr(self, "_owner", None)
        if owner is not None:
            owner._on_reconnect(self._generation)

    def _on_message(self, message: str) -> None:
        self._owner._touch(self._generation)
        try:
            msg = orjson.loads(message)   # a book delta in a third of json's time, on the stream thread
        except (ValueError, TypeError):
            self._owner._bad(self._generation, "undecodable frame")
            return
        if isinstance(msg, dict) and self._is_custom_pong(msg):
            return
        self.callback(msg)

    def _on_pong(self) -> None:
        self._owner._touch(self._generation)
        super()._on_pong()

    def _deliver(self, msg: Any) -> None:
        """Every frame lands here: one bad message is logged and counted, never fatal to the stream."""
        try:
            if not isinstance(msg, dict):
                raise ValueError("frame is not a JSON object")
            self._owner._handle(self._generation, msg)
        except Exception as exc:  # noqa: BLE001 - a stream must outlive any single bad message
            self._owner._bad(self._generation, f"{type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        """Close for good: no pybit reconnect afterwards."""
        self.handle_error = False
        self.exit()


class _Stream:
    """One logical subscription set over a pybit WebSocket that the watchdog can rebuild."""

    channel = "linear"
    subscriptions = 0  # subscribe frames _subscribe() sends (each is acked once)

    def __init__(self, endpoints: Endpoints, *, stale_after: float, ping_interval: float = 20.0,
                 ping_timeout: float = 10.0, build_timeout: float = 15.0) -> None:
        self.endpoints = endpoints
        self.stale_after = stale_after
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.build_timeout = build_timeout
        self.lock = threading.RLock()
        self.bad_messages = 0
        self.rebuilds = 0
        self.reconnects = 0
        self.last_error = ""
        self.acks = 0
        self._generation = 0
        self._ws: _GuardedWebSocket | None = None
        self._last_frame = time.monotonic()

    # -- to override
    def _credentials(self) -> dict:
        return {}

    def _subscribe(self, ws: _GuardedWebSocket) -> None:
        raise NotImplementedError

    def _on_topic(self, msg: dict) -> None:
        raise NotImplementedError

    def _connection_reset(self) -> None:
        """Local state to drop when the connection is (re)made."""

    # -- lifecycle
    def start(self) -> "_Stream":
        """Connect and subscribe (raises if the exchange cannot be reached)."""
        self._build()
        return self

    def _build(self) -> None:
        """A fresh pybit WebSocket with our subscriptions; the previous one is shut down."""
        with self.lock:
            self._generation += 1
            generation = self._generation
            old, self._ws = self._ws, None
            self.acks = 0
            self._connection_reset()
        if old is not None:
            old.shutdown()
        ws = _GuardedWebSocket(self, generation, self.endpoints.ws_url, channel_type=self.channel,
                               testnet=self.endpoints.testnet, demo=self.endpoints.demo,
                               ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                               **self._credentials())
        self._subscribe(ws)
        with self.lock:
            if generation != self._generation:
                ws.shutdown()
                return
            self._ws = ws
            self._last_frame = time.monotonic()

    def rebuild(self, reason: str) -> bool:
        """Rebuild the connection in a helper thread bounded by build_timeout; True on success."""
        log.warning("%s stream: rebuilding connection (%s)", self.channel, reason)
        outcome: dict[str, Exception | None] = {}

        def run() -> None:
            try:
                self._build()
                outcome["error"] = None
            except Exception as exc:  # noqa: BLE001 - reported to the watchdog below
                outcome["error"] = exc
        worker = threading.Thread(target=run, name=f"ws-rebuild-{self.channel}", daemon=True)
        worker.start()
        worker.join(self.build_timeout)
        error = outcome.get("error", TimeoutError("rebuild timed out"))
        if error is not None:
            self.last_error = f"rebuild failed: {type(error).__name__}"
            log.error("%s stream: %s", self.channel, self.last_error)
            return False
        self.rebuilds += 1
        return True

    def close(self) -> None:
        """Stop the stream for good."""
        with self.lock:
            self._generation += 1
            ws, self._ws = self._ws, None
        if ws is not None:
            ws.shutdown()

    # -- health
    @property
    def connected(self) -> bool:
        """Whether the current socket is open."""
        ws = self._ws
        return ws is not None and ws.is_connected()

    def silence(self) -> float:
        """Seconds since the last frame of any kind (data, pong) arrived."""
        return time.monotonic() - self._last_frame

    def health(self) -> str:
        """'ok', or why the watchdog should rebuild: 'disconnected', 'stale', or a subclass reason."""
        if not self.connected:
            return "disconnected"
        if self.silence() > self.stale_after:
            return "stale"
        return "ok"

    # -- callbacks from _GuardedWebSocket (WS thread)
    def _current(self, generation: int) -> bool:
        return generation == self._generation

    def _touch(self, generation: int) -> None:
        if self._current(generation):
            self._last_frame = time.monotonic()

    def _on_reconnect(self, generation: int) -> None:
        if self._current(generation) and self._ws is not None:
            self.reconnects += 1
            with self.lock:
                self.acks = 0
                self._connection_reset()

    def _bad(self, generation: int, why: str) -> None:
        self.bad_messages += 1
        log.error("%s stream: bad message #%d dropped (%s)", self.channel, self.bad_messages, why)

    def _handle(self, generation: int, msg: dict) -> None:
        if not self._current(generation):
            return
        if "topic" not in msg:
            self._control(msg)
            return
        self._on_topic(msg)

    @property
    def ready(self) -> bool:
        """Connected and every subscription acknowledged (pushes from now on reach us)."""
        return self.connected and self.acks >= self.subscriptions

    def _control(self, msg: dict) -> None:
        """Acks for auth/subscribe: failures are logged and make the stream unhealthy."""
        if msg.get("op") == "subscribe" and msg.get("success") is True:
            self.acks += 1
        if msg.get("success") is False or msg.get("type") == "error":
            self.last_error = f"{msg.get('op', 'request')} refused: {msg.get('ret_msg', '')}"
            log.error("%s stream: %s", self.channel, self.last_error)


class BookOutOfSync(RuntimeError):
    """The local book does not mirror the exchange right now (no snapshot yet, gap, reset)."""


def _guarded(fn: Callable[..., None] | None, name: str) -> Callable[..., None]:
    """A user callback that logs instead of raising (a bad handler must not stop the feed)."""
    def call(*args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - isolate user code from the stream
            log.exception("user callback %s failed", name)
    return call


class MarketStream(_Stream):
    """Public linear stream: our own sequence-checked book plus trades (and klines if asked)."""

    channel = "linear"

    def __init__(self, endpoints: Endpoints, symbol: str, *, depth: int = 50, kline_interval: int | None = None,
                 on_trades: Callable[[list], None] | None = None, on_kline: Callable[[list], None] | None = None,
                 on_book: Callable[["MarketStream"], None] | None = None, book_capacity: int = 1024,
                 resync_after: float = 2.0, **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self.symbol, self.depth, self.kline_interval = symbol, depth, kline_interval
        self.book = OrderBook(capacity=book_capacity)
        self.book_topic = f"orderbook.{depth}.{symbol}"
        self.resync_after = resync_after
        self.awaiting_snapshot = True
        self.skipped_deltas = 0
        self.book_ts = 0
        self._invalid_since: float | None = time.monotonic()
        self._on_trades = _guarded(on_trades, "on_trades")
        self._on_kline = _guarded(on_kline, "on_kline")
        self._on_book = _guarded(on_book, "on_book")

    def _subscribe(self, ws: _GuardedWebSocket) -> None:
        self.subscriptions = 2 + (self.kline_interval is not None)
        ws.orderbook_stream(self.depth, self.symbol, _unused)
        ws.trade_stream(self.symbol, _unused)
        if self.kline_interval is not None:
            ws.kline_stream(self.kline_interval, self.symbol, _unused)

    def _connection_reset(self) -> None:
        self.awaiting_snapshot = True
        if self._invalid_since is None:
            self._invalid_since = time.monotonic()

    def _on_topic(self, msg: dict) -> None:
        topic = msg["topic"]
        if topic == self.book_topic:
            self._apply_book(msg)
        elif topic.startswith("publicTrade."):
            self._on_trades(msg.get("data") or [])
        elif topic.startswith("kline."):
            self._on_kline(msg.get("data") or [])

    def _apply_book(self, msg: dict) -> None:
        """Feed the book; deltas before the first snapshot of a connection are skipped and counted."""
        with self.lock:
            if self.awaiting_snapshot and msg.get("type") != "snapshot":
                self.skipped_deltas += 1
                return
            self.book.apply_bybit(msg)
            if msg.get("type") == "snapshot":
                self.awaiting_snapshot = False
            self.book_ts = int(msg.get("cts") or msg.get("ts") or 0)
            if self.book.valid:
                self._invalid_since = None
            elif self._invalid_since is None:
                self._invalid_since = time.monotonic()
                log.warning("book %s invalid (gap or reset): waiting for a snapshot", self.book_topic)
        self._on_book(self)

    @property
    def book_valid(self) -> bool:
        """Whether the local book mirrors the exchange (snapshot seen, no gap since)."""
        with self.lock:
            return self.book.valid and not self.awaiting_snapshot

    def top(self) -> tuple[float, float]:
        """(best bid, best ask) of a valid book; raises if the book is not in sync."""
        with self.lock:
            if not self.book.valid or self.awaiting_snapshot:
                raise BookOutOfSync(f"book {self.book_topic} is not in sync")
            return float(self.book.best_bid()), float(self.book.best_ask())

    def stats(self, n_levels: int) -> BookStats:
        """BookStats (spread, micro-price, imbalance, depth...) of a valid book over the top n levels."""
        with self.lock:
            if not self.book.valid or self.awaiting_snapshot:
                raise BookOutOfSync(f"book {self.book_topic} is not in sync")
            return self.book.stats(n_levels)

    def health(self) -> str:
        base = super().health()
        if base != "ok":
            return base
        since = self._invalid_since
        if since is not None and time.monotonic() - since > self.resync_after:
            return "book_invalid"
        return "ok"


# Bybit V5 orderStatus (exchange_apis.md 2.7): a final status never turns open again. Triggered is the
# instant a conditional order goes live (it is followed by New), so it ranks as open.
FINAL_ORDER_STATUSES = frozenset({"Filled", "Cancelled", "Rejected", "Deactivated", "PartiallyFilledCanceled"})
_OPEN_STATUS_RANK = {"Untriggered": 0, "Triggered": 1, "New": 2, "PartiallyFilled": 3}


def _status_rank(status: Any) -> int:
    """Lifecycle order of an orderStatus: Untriggered < Triggered < New < PartiallyFilled < any final one."""
    return 4 if status in FINAL_ORDER_STATUSES else _OPEN_STATUS_RANK.get(str(status), 2)


def _repeat_or_back(old: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """'duplicate: …' for a row equal to the stored one, 'stale: …' when one of the numeric fields `keys` (each
    monotonic on the exchange) decreased, else '' (a missing or non-numeric field is not compared)."""
    if new == old:
        return "duplicate: this row is already applied"
    for key in keys:
        try:
            before, after = Decimal(str(old[key])), Decimal(str(new[key]))
        except (KeyError, InvalidOperation, ValueError):
            continue
        if after < before:
            return f"stale: {key} {new[key]} < stored {old[key]}"
    return ""


def order_drop_reason(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """Why an `order` push must not replace the stored row of its order ('' = apply it).

    Bybit never moves an order back: updatedTime (ms) and cumExecQty never decrease, a final status
    (FINAL_ORDER_STATUSES) is never followed by an open one, and within one millisecond the status only
    advances (Untriggered → Triggered → New → PartiallyFilled → final).
    """
    if old is None:
        return ""
    reason = _repeat_or_back(old, new, ("updatedTime", "cumExecQty"))
    if reason:
        return reason
    old_status, new_status = old.get("orderStatus"), new.get("orderStatus")
    if old_status in FINAL_ORDER_STATUSES and new_status not in FINAL_ORDER_STATUSES:
        return f"stale: {new_status} after the final status {old_status}"
    if new.get("updatedTime") == old.get("updatedTime") and _status_rank(new_status) < _status_rank(old_status):
        return f"stale: {new_status} after {old_status} in the same millisecond"
    return ""


def position_drop_reason(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """Why a `position` push must not replace the stored row of its positionIdx ('' = apply it).

    `seq` (the cross sequence of the last fill) and updatedTime (ms) never decrease; Bybit re-pushes the
    position on every order create/amend/cancel, so an identical row is a duplicate, not news.
    """
    return "" if old is None else _repeat_or_back(old, new, ("seq", "updatedTime"))


def wallet_drop_reason(old: tuple[int, Mapping[str, Any]] | None, new: tuple[int, Mapping[str, Any]]) -> str:
    """Why a `wallet` push, as (envelope creationTime ms, row), must not replace the stored one ('' = apply).

    Wallet rows carry no time or sequence of their own, so the envelope's creationTime orders them.
    """
    if old is None:
        return ""
    if new == old:
        return "duplicate: this push is already applied"
    if new[0] < old[0]:
        return f"stale: creationTime {new[0]} < stored {old[0]}"
    return ""


class PrivateStream(_Stream):
    """Authenticated order/execution/position/wallet pushes, applied idempotently and monotonically.

    State: `orders` (orderLinkId, else orderId → latest row), `executions` (row dicts in arrival order,
    each execId once), `positions` (positionIdx → latest row), `wallet` (latest row). A push row that was
    already applied, or is older than the state it would overwrite (order_drop_reason, position_drop_reason,
    wallet_drop_reason), is dropped, counted in `dropped[(topic, 'duplicate'|'stale')]` and logged; the
    on_message callback sees only the applied rows. A late execution is still a fill: it is kept.
    """

    channel = "private"
    subscriptions = 4
    seen_exec_ids = 50_000  # execIds remembered for de-duplication (10x the executions kept)

    def __init__(self, endpoints: Endpoints, creds: Credentials, *,
                 on_message: Callable[[str, list], None] | None = None, auth_timeout: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self._creds = creds
        self._user = _guarded(on_message, "on_message")
        self.orders: dict[str, dict] = {}
        self.executions: deque[dict] = deque(maxlen=5000)
        self.positions: dict[int, dict] = {}
        self.wallet: dict = {}
        self.dropped: Counter[tuple[str, str]] = Counter()
        self._exec_ids: dict[str, None] = {}
        self._wallet_time = 0
        self.updated = threading.Condition(self.lock)
        self.authenticated = False
        self.auth_timeout = auth_timeout
        self._auth_deadline = time.monotonic() + auth_timeout

    def _credentials(self) -> dict:
        # auth expiry 10 s ahead: a local clock behind the exchange by up to max_time_offset still authenticates
        return {"api_key": self._creds.api_key, "api_secret": self._creds.api_secret, "private_auth_expire": 10}

    def _subscribe(self, ws: _GuardedWebSocket) -> None:
        for method in (ws.order_stream, ws.execution_stream, ws.position_stream, ws.wallet_stream):
            method(_unused)

    def _connection_reset(self) -> None:
        self.authenticated = False
        self._auth_deadline = time.monotonic() + self.auth_timeout

    def health(self) -> str:
        base = super().health()
        if base == "ok" and not self.authenticated and time.monotonic() > self._auth_deadline:
            return "unauthenticated"
        return base

    def _control(self, msg: dict) -> None:
        if msg.get("op") == "auth" and msg.get("success") is True:
            self.authenticated = True
        super()._control(msg)

    def _on_topic(self, msg: dict) -> None:
        topic = str(msg["topic"]).split(".")[0]
        if topic not in ("order", "execution", "position", "wallet"):
            return
        created = int(msg.get("creationTime") or 0)
        with self.updated:
            applied = [row for row in msg.get("data") or [] if self._kept(topic, row, self._apply(topic, row, created))]
            if applied:
                self.updated.notify_all()
        if applied:
            self._user(topic, applied)

    def _apply(self, topic: str, row: dict, created: int) -> str:
        """Apply one row of `topic` (pushed at `created` ms) to the state; returns why not ('' = applied)."""
        if topic == "execution":
            return self._apply_execution(row)
        if topic == "wallet":
            reason = wallet_drop_reason((self._wallet_time, self.wallet) if self.wallet else None, (created, row))
            if not reason:
                self.wallet, self._wallet_time = row, created
            return reason
        store: dict[Any, dict]
        if topic == "order":
            store, key, rule = self.orders, row.get("orderLinkId") or row.get("orderId"), order_drop_reason
        else:
            store, key, rule = self.positions, int(row.get("positionIdx", 0)), position_drop_reason
        reason = rule(store.get(key), row)
        if not reason:
            store[key] = row
        return reason

    def _apply_execution(self, row: dict) -> str:
        """Append a fill unless its execId was applied before (the oldest remembered ids are forgotten)."""
        exec_id = row.get("execId")
        if exec_id in self._exec_ids:
            return "duplicate: execId already applied"
        if exec_id:
            self._exec_ids[exec_id] = None
            if len(self._exec_ids) > self.seen_exec_ids:
                del self._exec_ids[next(iter(self._exec_ids))]
        self.executions.append(row)
        return ""

    def _kept(self, topic: str, row: dict, reason: str) -> bool:
        """Count and log a dropped row (what and why); True when the row was applied. An unchanged position
        row is only counted (debug log): Bybit re-pushes the position on every order create/amend/cancel."""
        if not reason:
            return True
        kind = reason.split(":")[0]
        self.dropped[(topic, kind)] += 1
        what = " ".join(f"{k}={row[k]}" for k in ("orderLinkId", "orderId", "execId", "positionIdx", "accountType",
                                                   "orderStatus", "cumExecQty", "seq", "updatedTime")
                        if row.get(k) not in (None, ""))
        level = logging.WARNING if kind != "duplicate" else logging.DEBUG if topic == "position" else logging.INFO
        log.log(level, "private stream: dropped %s row %s (%s)", topic, what or "without ids", reason)
        return False

    def wait_for(self, predicate: Callable[["PrivateStream"], bool], timeout: float) -> bool:
        """Block until predicate(self) holds (re-checked on every push) or the timeout passes."""
        with self.updated:
            return self.updated.wait_for(lambda: predicate(self), timeout)


def _unused(_msg: Any) -> None:
    """pybit's *_stream() wants a callback even in raw mode, where it is never called."""


# ================================================================ watchdog
class StreamWatchdog:
    """Rebuilds streams that are disconnected, silent or out of sync, with backoff between failures."""

    def __init__(self, streams: Iterable[_Stream], *, interval: float = 1.0, max_backoff: float = 30.0) -> None:
        self.streams = list(streams)
        self.interval = interval
        self.max_backoff = max_backoff
        self._next_try: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> list[tuple[str, str]]:
        """One pass: rebuild every unhealthy stream whose backoff has expired; returns (channel, reason)."""
        actions = []
        now = time.monotonic()
        for i, stream in enumerate(self.streams):
            reason = stream.health()
            if reason == "ok":
                self._failures[i] = 0
                continue
            if now < self._next_try.get(i, 0.0):
                continue
            actions.append((stream.channel, reason))
            if stream.rebuild(reason):
                self._failures[i] = 0
                self._next_try[i] = 0.0
            else:
                self._failures[i] = self._failures.get(i, 0) + 1
                self._next_try[i] = now + min(self.max_backoff, self.interval * 2 ** self._failures[i])
        return actions

    def start(self) -> "StreamWatchdog":
        """Run check_once every interval in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="ws-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the watchdog must keep watching
                log.exception("watchdog pass failed")

    def stop(self) -> None:
        """Stop the watchdog thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ================================================================ CLI
def check_command(cfg: GlobalConfig, trading: bool) -> dict:
    """Run the startup checks and read the account: what an operator verifies before going live."""
    client = ExchangeClient.from_config(cfg)
    report = client.startup_checks(trading=trading)
    out: dict[str, Any] = {
        "exchange": client.endpoints.name, "symbol": client.symbol, "mode": cfg.live.mode,
        "time_offset_ms": round(report.time_offset_ms, 1), "tick_size": wire(report.rules.tick_size),
        "qty_step": wire(report.rules.qty_step), "min_qty": wire(report.rules.min_qty),
        "min_notional": wire(report.rules.min_notional), "position_mode": report.position_mode}
    if trading and client.creds is not None:
        out["key"] = client.creds.masked_key
        out["permissions"] = report.permissions.permissions if report.permissions else {}
        out["wallet"] = client.wallet()
        out["open_orders"] = len(client.open_orders())
        out["positions"] = {str(p.get("positionIdx")): p.get("size") for p in client.positions()}
    return out


def main(argv: list[str] | None = None) -> int:
    """`python exchange_client.py check`: startup checks against the configured exchange, as JSON."""
    parser = argparse.ArgumentParser(description="Bybit V5 client: pre-flight checks of keys, clock and instrument.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="clock offset, instrument rules, key permissions, mode, leverage, wallet")
    add_config_args(check, ["--symbol", "--mode", "--keys-file", "--keys-profile"])
    check.add_argument("--public-only", action="store_true", help="skip the checks that need API keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        result = check_command(cfg, trading=not args.public_only and cfg.live.mode != "dry-run")
    except (ConfigError, KeysError, ExchangeError) as exc:
        print(f"check failed: {exc}")
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
