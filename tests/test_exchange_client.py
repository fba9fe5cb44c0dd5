"""exchange_client: rounding, taxonomy, keys and permissions (pure), then the real pybit against paper_exchange."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pybit import _websocket_stream, unified_trading

import exchange_client as ec
import grid
import paper_exchange as pe
from config import GlobalConfig, InstrumentConfig
from paper_market import START_MS, SYMBOL, write_market

SECRET = "s3cr3t-Never-Log-This-0123456789"


def rules(**kw) -> ec.InstrumentRules:
    base = dict(symbol="DEMOUSDT", tick_size=Decimal("0.01"), qty_step=Decimal("0.001"),
                min_qty=Decimal("0.001"), min_notional=Decimal("5"))
    base.update(kw)
    return ec.InstrumentRules(**base)


# ---------------------------------------------------------------- rounding
def test_price_rounds_to_tick_and_float_artefacts_vanish_on_the_wire():
    r = rules()
    assert ec.wire(r.round_price(0.1 + 0.2)) == "0.30"
    assert r.round_price("100.005") == Decimal("100.01")
    assert r.round_price(100.004) == Decimal("100.00")
    assert ec.wire(rules(tick_size=Decimal("0.5")).round_price(1234.26)) == "1234.5"
    assert ec.wire(rules(tick_size=Decimal("1E-7")).round_price(0.00001234567)) == "0.0000123"


def test_passive_rounding_never_moves_a_maker_price_toward_the_market():
    r = rules()
    assert r.passive_price(100.009, "Buy") == Decimal("100.00")
    assert r.passive_price(100.001, "Sell") == Decimal("100.01")
    assert r.passive_price("100.00", "Sell") == Decimal("100.00")


@settings(max_examples=300, deadline=None)
@given(q=st.decimals(min_value=Decimal("0"), max_value=Decimal("100000"), places=9),
       step=st.sampled_from([Decimal("0.001"), Decimal("0.01"), Decimal("1"), Decimal("0.5"), Decimal("100")]))
def test_quantity_rounds_down_to_a_step_multiple(q, step):
    out = rules(qty_step=step, min_qty=step).round_qty(q)
    assert out <= q + step * Decimal(str(grid.GRID_EPS))     # the one rule snaps within a millionth of a step
    assert q - out < step
    assert out % step == 0


def test_order_checks_raise_the_exchange_classes_before_sending():
    r = rules()
    with pytest.raises(ec.InvalidParameterError) as exc:
        r.check_order(Decimal("0.0009"), Decimal("100"))
    assert exc.value.code == 10001 and exc.value.kind is ec.ErrorKind.REJECTED
    with pytest.raises(ec.MinNotionalError) as exc:
        r.check_order(Decimal("0.049"), Decimal("100"))
    assert exc.value.code == 110094
    r.check_order(Decimal("0.05"), Decimal("100"))
    r.check_order(Decimal("0.001"), Decimal("100"), reduce_only=True)


def test_rules_from_bybit_instrument_sample(realdata):
    sample = json.loads((realdata / "bybit_api_samples/http_responses/linear/instrument_btc_usdt.json").read_text())
    item = sample["result"]["list"][0]
    r = ec.InstrumentRules.from_bybit(item)
    assert r.tick_size == Decimal(item["priceFilter"]["tickSize"])
    assert r.qty_step == Decimal(item["lotSizeFilter"]["qtyStep"])
    assert r.min_qty == Decimal(item["lotSizeFilter"]["minOrderQty"])
    assert r.symbol == item["symbol"]


# ---------------------------------------------------------------- ids and taxonomy
def test_order_link_id_is_deterministic_short_and_valid():
    a = ec.order_link_id("DEMOUSDT|entry|Buy|2026-01-01T00:05")
    assert a == ec.order_link_id("DEMOUSDT|entry|Buy|2026-01-01T00:05")
    assert a != ec.order_link_id("DEMOUSDT|entry|Sell|2026-01-01T00:05")
    assert len(a) <= 36 and re.fullmatch(r"[A-Za-z0-9_-]+", a)
    assert ec.is_own_order(a) and not ec.is_own_order("manual-order")
    with pytest.raises(ValueError):
        ec.order_link_id("")


@pytest.mark.parametrize("code,cls,kind", [
    (10001, ec.InvalidParameterError, ec.ErrorKind.REJECTED),
    (110094, ec.MinNotionalError, ec.ErrorKind.REJECTED),
    (110007, ec.InsufficientBalanceError, ec.ErrorKind.REJECTED),
    (110072, ec.DuplicateOrderError, ec.ErrorKind.REJECTED),
    (110001, ec.OrderNotFoundError, ec.ErrorKind.REJECTED),
    (110017, ec.ReduceOnlyError, ec.ErrorKind.REJECTED),
    (10002, ec.TimestampError, ec.ErrorKind.RETRYABLE),
    (10006, ec.RateLimitError, ec.ErrorKind.RETRYABLE),
    (10016, ec.RetryableError, ec.ErrorKind.RETRYABLE),
    (34040, ec.BenignError, ec.ErrorKind.BENIGN),
    (110043, ec.BenignError, ec.ErrorKind.BENIGN),
    (110025, ec.BenignError, ec.ErrorKind.BENIGN),
    (10003, ec.AuthenticationError, ec.ErrorKind.FATAL),
    (10004, ec.AuthenticationError, ec.ErrorKind.FATAL),
    (999999, ec.RejectedError, ec.ErrorKind.REJECTED),
])
def test_taxonomy_maps_codes_to_classes_and_kinds(code, cls, kind):
    assert ec.error_class(code) is cls
    assert ec.classify(code) is kind


def test_retry_policy_backs_off_exponentially_and_honours_rate_limit_reset():
    p = ec.RetryPolicy(base_delay=0.5, max_delay=3.0, max_rate_limit_wait=10.0)
    err = ec.RetryableError("x")
    assert [p.delay(i, err) for i in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert p.delay(1, ec.RateLimitError("x", retry_after=1.7)) == 1.7
    assert p.delay(1, ec.RateLimitError("x", retry_after=99.0)) == 10.0
    assert p.delay(1, ec.RateLimitError("x", retry_after=-2.0)) == 0.0


# ---------------------------------------------------------------- key permissions
@pytest.mark.parametrize("perms,unsafe", [
    ({"ContractTrade": ["Order", "Position"], "Wallet": []}, []),
    ({"ContractTrade": ["Order", "Position"], "Wallet": ["Withdraw"]}, ["Wallet:Withdraw"]),
    ({"ContractTrade": ["Order"], "Wallet": ["AccountTransfer", "SubMemberTransfer"]},
     ["Wallet:AccountTransfer", "Wallet:SubMemberTransfer"]),
])
def test_key_permissions_flag_any_way_to_move_funds(perms, unsafe):
    kp = ec.KeyPermissions.from_bybit({"readOnly": 0, "permissions": perms, "ips": ["1.2.3.4"]})
    assert kp.unsafe_reasons() == unsafe
    assert kp.can_trade


def test_read_only_key_cannot_trade():
    kp = ec.KeyPermissions.from_bybit({"readOnly": 1, "permissions": {"ContractTrade": ["Order"]}})
    assert not kp.can_trade


# ---------------------------------------------------------------- keys
def write_keys(tmp_path, payload) -> str:
    path = tmp_path / "keys.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def test_keys_profile_is_loaded_and_secret_hidden_from_repr(tmp_path):
    path = write_keys(tmp_path, {"profiles": {"paper": {"api_key": "paperkey", "api_secret": SECRET,
                                                        "url": "http://127.0.0.1:8765/"}}})
    creds = ec.load_credentials(path, "paper", env={})
    assert (creds.api_key, creds.api_secret, creds.url, creds.profile) == ("paperkey", SECRET,
                                                                           "http://127.0.0.1:8765", "paper")
    assert SECRET not in repr(creds) and SECRET not in str(creds)


def test_env_keys_used_only_when_no_keys_file(tmp_path):
    env = {"BYBIT_API_KEY": "envkey", "BYBIT_API_SECRET": SECRET}
    creds = ec.load_credentials(tmp_path / "absent.json", "default", env=env)
    assert (creds.api_key, creds.source) == ("envkey", "environment")
    with pytest.raises(ec.KeysError, match="absent.json"):
        ec.load_credentials(tmp_path / "absent.json", "default", env={})


@pytest.mark.parametrize("payload,match", [
    ('{"profiles": {"default": {"api_key": "k", "api_secret": "' + SECRET + '",}}', r"invalid JSON at line 1"),
    ({"profiles": {"other": {"api_key": "k", "api_secret": SECRET}}}, r"unknown profile 'default'.*other"),
    ({"profiles": {"default": {"api_key": "k"}}}, r"profile 'default': field 'api_secret' is missing"),
    ({"profiles": {"default": {"api_key": SECRET, "api_secret": 12345}}}, r"field 'api_secret' is missing"),
    ({"profiles": {"default": {"api_key": "k", "api_secret": SECRET, "url": "ftp://x"}}}, r"field 'url'"),
    ({"default": {"api_key": "k", "api_secret": SECRET}}, r"expected \{\"profiles\""),
])
def test_bad_keys_file_errors_name_file_and_profile_never_the_secret(tmp_path, payload, match):
    path = write_keys(tmp_path, payload)
    env = {"BYBIT_API_KEY": "envkey", "BYBIT_API_SECRET": "envsecret"}
    with pytest.raises(ec.KeysError, match=match) as exc:
        ec.load_credentials(path, "default", env=env)
    text = str(exc.value)
    assert path in text
    assert SECRET not in text and "envsecret" not in text and exc.value.__cause__ is None


# ---------------------------------------------------------------- endpoints
def test_endpoints_follow_config_and_profile():
    cfg = GlobalConfig()
    cfg.live.mode = "paper"
    with pytest.raises(ec.FatalError, match="paper"):
        ec.resolve_endpoints(cfg.live, None)
    creds = ec.Credentials("k", SECRET, url="http://127.0.0.1:9999")
    ep = ec.resolve_endpoints(cfg.live, creds)
    assert (ep.rest_url, ep.ws_url, ep.testnet) == ("http://127.0.0.1:9999", "ws://127.0.0.1:9999", False)
    cfg.live.rest_url, cfg.live.ws_url = "http://127.0.0.1:1/", "ws://127.0.0.1:2"
    assert ec.resolve_endpoints(cfg.live, creds).ws_url == "ws://127.0.0.1:2"
    cfg.live.mode, cfg.live.rest_url, cfg.live.ws_url = "testnet", "", ""
    ep = ec.resolve_endpoints(cfg.live, ec.Credentials("k", SECRET))
    assert ep.testnet and ep.rest_url == "" and ep.name == "testnet"
    cfg.live.mode = "live"
    with pytest.raises(ec.FatalError, match="testnet"):
        ec.resolve_endpoints(cfg.live, ec.Credentials("k", SECRET, testnet=True))


def test_rules_from_config_match_instrument_defaults():
    r = ec.InstrumentRules.from_config("DEMOUSDT", InstrumentConfig())
    assert (r.tick_size, r.qty_step, r.min_qty, r.min_notional) == (Decimal("0.01"), Decimal("0.001"),
                                                                    Decimal("0.001"), Decimal("5.0"))


# ================================================================ real pybit against paper_exchange
KEY = "paperkey"
# second i of the scripted market has mid MIDS[i] (trades print at the ask): flat, a dip (fills resting
# buys), a step to 100.49 (a trade at 100.50 triggers a TP there), a rally (fills the TP limit), flat
MIDS = [100.0] * 5 + [99.5] * 5 + [100.49] * 3 + [101.0] * 7 + [100.0] * 100


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> bool:
    """Poll until predicate() is true (background threads deliver WS pushes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@pytest.fixture
def paper(tmp_path):
    """A paper exchange on 127.0.0.1 with a manual market clock, stopped by the test."""
    folder = write_market(tmp_path, MIDS)
    exchange = pe.build_exchange(folder, balance=10000.0, speed=0.0, api_key=KEY, api_secret=SECRET)
    with pe.ExchangeThread(exchange) as thread:
        yield thread


def make_client(paper, secret: str = SECRET, key: str = KEY, **live) -> ec.ExchangeClient:
    cfg = GlobalConfig()
    cfg.symbol = SYMBOL
    cfg.live.mode = "paper"
    cfg.live.rest_url = paper.url
    cfg.live.request_timeout = "1s"
    cfg.live.ws_stale_after = "30s"
    cfg.live.position_mode = "oneway"   # the paper account's own mode; tests that need hedge ask for it
    for name, value in live.items():
        setattr(cfg.live, name, value)
    return ec.ExchangeClient(cfg, ec.Credentials(key, secret),
                             retry=ec.RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2))


def pos_size(stream: ec.PrivateStream, idx: int = 0) -> float:
    return float(stream.positions.get(idx, {}).get("size", "nan"))


def set_fault(paper, **faults) -> None:
    def apply() -> None:
        for name, value in faults.items():
            setattr(paper.exchange.faults, name, value)
    paper.call(apply)


def engine_orders(paper) -> list:
    return paper.call(lambda: [o for o in paper.exchange.engine.orders.values() if not o.stop_order_type])


@pytest.fixture
def client(paper):
    c = make_client(paper)
    c.startup_checks()
    yield c
    c.close()


def test_startup_checks_load_rules_and_accept_a_trade_only_key(paper):
    c = make_client(paper, leverage=5.0)
    report = c.startup_checks()
    assert report.rules.tick_size == Decimal("0.01") and report.rules.min_notional == Decimal("5")
    assert abs(report.time_offset_ms) < 1000
    assert report.permissions.can_trade and report.permissions.unsafe_reasons() == []
    assert c.positions()[0]["leverage"] == "5"
    assert c.set_leverage(5.0) is False          # 110043 is benign: already set
    assert c.set_position_mode("oneway") is False  # 110025 is benign


def test_an_unknown_symbol_is_a_refused_startup_check_not_an_unreachable_exchange(paper):
    """The venue answers an instruments query for a symbol it does not list with a parameter error (10001):
    the startup checks refuse the instrument (the engine's exit 3), they do not report the exchange as down."""
    c = make_client(paper)
    c.symbol = "NOPEUSDT"
    with pytest.raises(ec.StartupCheckError, match="instrument NOPEUSDT not found"):
        c.startup_checks()
    c.close()


def test_a_proxy_in_the_environment_is_not_used_for_the_paper_exchange_on_127_0_0_1(paper, monkeypatch):
    """requests would send 127.0.0.1 through HTTP(S)_PROXY (no NO_PROXY on Linux); the paper venue is local."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")     # the discard port: nothing listens, a proxied call fails
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    c = make_client(paper)
    assert c.startup_checks().rules.tick_size == Decimal("0.01")
    c.close()


def test_startup_switches_to_hedge_mode(paper):
    c = make_client(paper, position_mode="hedge")
    c.startup_checks()
    assert sorted(int(p["positionIdx"]) for p in c.positions()) == [1, 2]
    ack = c.place_order("hedge-1", "Sell", 0.1, price=100.50, time_in_force="PostOnly")
    assert c.find_order(ack.order_link_id)["positionIdx"] == 2


@pytest.mark.parametrize("wallet", [["Withdraw"], ["AccountTransfer"], ["SubMemberTransfer"]])
def test_startup_refuses_a_key_that_can_move_funds(paper, wallet):
    paper.call(lambda: paper.exchange.permissions.update({"Wallet": wallet}))
    with pytest.raises(ec.StartupCheckError, match=f"Wallet:{wallet[0]}") as exc:
        make_client(paper).startup_checks()
    assert exc.value.kind is ec.ErrorKind.FATAL


def test_startup_refuses_a_read_only_key(paper):
    paper.call(lambda: paper.exchange.permissions.update({"ContractTrade": []}))
    with pytest.raises(ec.StartupCheckError, match="cannot place contract orders"):
        make_client(paper).startup_checks()
    make_client(paper).startup_checks(trading=False)  # market data only: still allowed


def test_startup_refuses_a_position_mode_it_cannot_switch_to(paper, client):
    client.place_order("open-long", "Buy", 0.1, order_type="Market")
    with pytest.raises(ec.StartupCheckError, match="cannot switch to hedge mode") as exc:
        make_client(paper, position_mode="hedge").startup_checks()
    assert "positionIdx [0]" in str(exc.value)


def test_startup_refuses_a_skewed_clock(paper):
    set_fault(paper, time_skew_ms=5000)
    with pytest.raises(ec.StartupCheckError, match="clock offset"):
        make_client(paper).startup_checks()
    set_fault(paper, time_skew_ms=-2000)  # local clock 2 s ahead: Bybit would reject raw local timestamps
    c = make_client(paper, max_time_offset="3s")
    assert c.startup_checks().time_offset_ms == pytest.approx(-2000, abs=300)
    assert c.positions() and c.error_counts["TimestampError"] == 0  # signed with the exchange's clock


def test_full_order_lifecycle_postonly_tpsl_fill_exit_and_close(paper, client):
    private = client.private_stream().start()
    try:
        assert wait_until(lambda: private.authenticated and private.ready)
        ack = client.place_order("life-entry", "Buy", "0.1049", price=99.905, time_in_force="PostOnly",
                                 take_profit=100.50, tp_limit_price=100.50, stop_loss=99.0)
        placed = client.find_order(ack.order_link_id)
        assert (placed["price"], placed["qty"], placed["orderStatus"]) == ("99.90", "0.104", "New")
        assert placed["timeInForce"] == "PostOnly" and placed["orderLinkId"] == ec.order_link_id("life-entry")
        paper.advance(6)  # the dip: the ask crosses our bid, we fill as maker
        assert private.wait_for(lambda s: s.orders.get(ack.order_link_id, {}).get("orderStatus") == "Filled", 5)
        assert wait_until(lambda: pos_size(private) == 0.104)
        paper.advance(10)  # the rally: a trade at 100.50 triggers the TP, its resting limit fills as maker
        assert private.wait_for(lambda s: pos_size(s) == 0.0, 5)
        tp_fills = [e for e in private.executions if e.get("createType") == "CreateByTakeProfit"]
        assert tp_fills and tp_fills[-1]["execPrice"] == "100.50" and tp_fills[-1]["isMaker"] is True
        assert [o for o in client.open_orders() if o["stopOrderType"] == "PartialStopLoss"] == []
        # a market entry closed by a reduce-only market order
        client.place_order("life-mkt", "Buy", 0.1, order_type="Market")
        assert private.wait_for(lambda s: pos_size(s) == 0.1, 5)
        client.place_order("life-close", "Sell", 0.1, order_type="Market", reduce_only=True)
        assert private.wait_for(lambda s: pos_size(s) == 0.0, 5)
        assert float(client.positions()[0]["size"]) == 0.0
        wallet = client.wallet()
        assert wallet["equity"] > 10000.0 - 1.0 and wallet["equity"] != 10000.0
        # a crossing PostOnly is acked, then cancelled by the exchange with the documented reason
        crossing = client.place_order("life-cross", "Buy", 0.1, price=105.0, time_in_force="PostOnly")
        assert private.wait_for(lambda s: s.orders.get(crossing.order_link_id, {}).get("orderStatus")
                                == "Cancelled", 5)
        assert private.orders[crossing.order_link_id]["rejectReason"] == "EC_PostOnlyWillTakeLiquidity"
    finally:
        private.close()


def test_a_sell_postonly_a_hair_off_the_grid_rests_on_its_own_tick(client):
    """10057 * 0.01 = 100.57000000000001 (the old strategy.limit_price result) used to rest at 100.58."""
    ack = client.place_order("hair", "Sell", "0.1", price=10057 * 0.01, time_in_force="PostOnly")
    assert client.find_order(ack.order_link_id)["price"] == "100.57"


def test_reduce_only_conditional_stop_triggers_on_the_fall(paper, client):
    client.place_order("cond-entry", "Buy", 0.1, order_type="Market")
    ack = client.place_order("cond-stop", "Sell", 0.1, order_type="Market", reduce_only=True,
                             trigger_price=99.604, trigger_direction=2)
    row = client.find_order(ack.order_link_id)
    assert (row["orderStatus"], row["triggerPrice"], row["reduceOnly"]) == ("Untriggered", "99.60", True)
    paper.advance(7)  # the dip prints at 99.51: the stop triggers and closes the long
    assert client.find_order(ack.order_link_id)["orderStatus"] == "Filled"
    assert float(client.positions()[0]["size"]) == 0.0


def raw_order(**kw) -> dict:
    params = {"category": "linear", "symbol": SYMBOL, "side": "Buy", "orderType": "Limit", "qty": "0.1",
              "price": "99.00", "timeInForce": "GTC", "positionIdx": 0}
    params.update(kw)
    return params


@pytest.mark.parametrize("params,cls,code", [
    (raw_order(qty="0.0005"), ec.InvalidParameterError, 10001),
    (raw_order(qty="0.01"), ec.MinNotionalError, 110094),
    (raw_order(qty="5000"), ec.InsufficientBalanceError, 110007),
    (raw_order(orderType="Market", side="Sell", reduceOnly=True, price=None, timeInForce=None),
     ec.ReduceOnlyError, 110017),
])
def test_exchange_error_codes_raise_taxonomy_classes(client, params, cls, code):
    with pytest.raises(cls) as exc:
        client.request("place_order", {k: v for k, v in params.items() if v is not None})
    assert exc.value.code == code and exc.value.kind is ec.ErrorKind.REJECTED
    assert client.error_counts[cls.__name__] == 1  # rejections are never retried


def test_typed_calls_raise_the_same_classes(client):
    with pytest.raises(ec.OrderNotFoundError) as exc:
        client.cancel_order(order_link_id=ec.order_link_id("never-placed"))
    assert exc.value.code == 110001
    with pytest.raises(ec.ReduceOnlyError):
        client.place_order("ro", "Sell", 0.1, order_type="Market", reduce_only=True)
    with pytest.raises(ec.MinNotionalError):
        client.place_order("tiny", "Buy", 0.01, price=99.0)  # refused locally, same class as 110094
    with pytest.raises(ec.InvalidParameterError):
        client.place_order("dust", "Buy", 0.0009, price=99.0)  # rounds down to 0: below minOrderQty


def test_rejections_are_not_sent_twice(paper, client):
    with pytest.raises(ec.InsufficientBalanceError):
        client.place_order("huge", "Buy", 5000, price=99.0)
    assert client.error_counts["InsufficientBalanceError"] == 1 and engine_orders(paper) == []


def test_duplicate_order_link_id_is_already_placed_not_a_second_order(paper, client):
    first = client.place_order("dup", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    with pytest.raises(ec.DuplicateOrderError) as exc:
        client.request("place_order", raw_order(orderLinkId=first.order_link_id))
    assert exc.value.code == 110072
    again = client.place_order("dup", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    assert again.recovered and again.order_id == first.order_id
    assert len(engine_orders(paper)) == 1


def test_timestamp_outside_window_resyncs_the_clock_and_retries(paper, client):
    set_fault(paper, time_skew_ms=-1500)  # the clocks drift apart after startup
    assert client.positions()
    assert client.error_counts["TimestampError"] == 1
    assert client.time_offset_ms == pytest.approx(-1500, abs=300)


def test_timestamp_error_with_a_clock_beyond_the_limit_is_fatal(paper, client):
    set_fault(paper, time_skew_ms=-20000)
    with pytest.raises(ec.ClockSkewError, match="clock offset") as exc:
        client.positions()
    assert exc.value.kind is ec.ErrorKind.FATAL
    assert client.error_counts["TimestampError"] == 1


def test_order_through_a_drifted_clock_resyncs_once_and_lands_once(paper, client):
    set_fault(paper, time_skew_ms=-1500)  # the exchange clock falls 1.5 s behind: inside the 3 s limit
    ack = client.place_order("drift-entry", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    assert client.error_counts["TimestampError"] == 1  # one 10002, one resync, one resend
    assert client.time_offset_ms == pytest.approx(-1500, abs=300)
    orders = engine_orders(paper)
    assert [(o.order_id, o.link_id) for o in orders] == [(ack.order_id, ec.order_link_id("drift-entry"))]


# every signed path: each call meets its own fresh drift, so each must resync by itself
SIGNED_CALLS = {
    "stop order": lambda c: c.place_order("drift-stop", "Sell", 0.1, order_type="Market", reduce_only=True,
                                          trigger_price=99.0, trigger_direction=2),
    "amend": lambda c: c.amend_order(order_link_id=ec.order_link_id("resting"), price=98.5),
    "cancel": lambda c: c.cancel_order(order_link_id=ec.order_link_id("resting")),
    "position stop": lambda c: c.set_trading_stop(side="Buy", stop_loss=98.0),
    "cancel all": lambda c: c.cancel_all(),
    "wallet": lambda c: c.wallet(),
}


@pytest.mark.parametrize("name", list(SIGNED_CALLS))
def test_every_signed_call_resyncs_the_clock_on_10002(paper, client, name):
    client.place_order("drift-long", "Buy", 0.1, order_type="Market")
    client.place_order("resting", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    set_fault(paper, time_skew_ms=-1500)
    SIGNED_CALLS[name](client)
    assert client.error_counts["TimestampError"] == 1
    assert client.time_offset_ms == pytest.approx(-1500, abs=300)


def test_order_through_a_clock_beyond_the_limit_raises_clock_skew_and_sends_nothing(paper, client):
    set_fault(paper, time_skew_ms=-5000)
    with pytest.raises(ec.ClockSkewError, match="max_time_offset") as exc:
        client.place_order("skewed", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    assert exc.value.kind is ec.ErrorKind.FATAL
    assert client.error_counts["TimestampError"] == 1 and engine_orders(paper) == []
    set_fault(paper, time_skew_ms=-1500)  # the clock comes back within the limit: the same intent lands once
    ack = client.place_order("skewed", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    assert [o.link_id for o in engine_orders(paper)] == [ack.order_link_id]


def test_rate_limit_burst_backs_off_until_the_reset_header(paper, client):
    set_fault(paper, rate_limit_burst=3)
    started = time.monotonic()
    rows = client.positions()
    elapsed = time.monotonic() - started
    assert rows and client.error_counts["RateLimitError"] == 3
    assert elapsed >= 0.45  # three waits of ~0.2 s each until the X-Bapi-Limit-Reset-Timestamp


def test_wrong_secret_is_fatal_and_not_retried(paper):
    c = make_client(paper, secret="wrong-secret")
    with pytest.raises(ec.AuthenticationError) as exc:
        c.positions()
    assert exc.value.code == 10004 and exc.value.kind is ec.ErrorKind.FATAL
    assert c.error_counts["AuthenticationError"] == 1


# ---------------------------------------------------------------- injected faults
@pytest.mark.parametrize("fault", [{"lose_acks": 1}, {"ack_delay_s": 1.5}])
def test_lost_ack_never_doubles_an_order(paper, client, fault):
    set_fault(paper, **fault)
    ack = client.place_order("lost-ack", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    set_fault(paper, lose_acks=0, ack_delay_s=0.0)
    assert ack.recovered
    orders = engine_orders(paper)
    assert len(orders) == 1 and orders[0].order_id == ack.order_id and orders[0].link_id == ack.order_link_id


def test_cancel_whose_ack_was_lost_counts_as_cancelled(paper, client):
    ack = client.place_order("cancel-lost", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    set_fault(paper, lose_acks=1)
    client.cancel_order(order_link_id=ack.order_link_id)  # the retry meets 110001: our first try worked
    assert client.find_order(ack.order_link_id)["orderStatus"] == "Cancelled"
    with pytest.raises(ec.OrderNotFoundError):  # without an unanswered attempt, 110001 is the caller's news
        client.cancel_order(order_link_id=ack.order_link_id)


def test_amend_cancel_all_and_position_stops(paper, client):
    ack = client.place_order("amend-me", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    client.amend_order(order_link_id=ack.order_link_id, price=98.504, qty=0.2)
    row = client.find_order(ack.order_link_id)
    assert (row["price"], row["qty"], row["orderStatus"]) == ("98.50", "0.200", "New")
    client.place_order("second", "Sell", 0.1, price=101.0, time_in_force="PostOnly")
    assert sorted(client.cancel_all()) == sorted(o.order_id for o in engine_orders(paper))
    assert client.open_orders() == []
    client.place_order("pos", "Buy", 0.1, order_type="Market")
    assert client.set_trading_stop(side="Buy", take_profit=102.004, stop_loss=98.0) is True
    assert client.set_trading_stop(side="Buy", take_profit=102.0, stop_loss=98.0) is False  # 34040 benign
    stops = {o["stopOrderType"]: o["triggerPrice"] for o in client.open_orders()}
    assert stops == {"TakeProfit": "102.00", "StopLoss": "98.00"}
    assert client.set_trading_stop(side="Buy", take_profit=0) is True  # "0" clears the TP
    assert {o["stopOrderType"] for o in client.open_orders()} == {"StopLoss"}


def test_http_5xx_is_retried(paper, client):
    set_fault(paper, http_5xx=2)
    assert client.positions()
    assert client.error_counts["RetryableError"] == 2
    set_fault(paper, http_5xx=1)
    ack = client.place_order("after-5xx", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
    assert not ack.recovered and len(engine_orders(paper)) == 1


def test_http_5xx_beyond_the_retry_budget_raises_retryable(paper, client):
    set_fault(paper, http_5xx=10)
    with pytest.raises(ec.RetryableError) as exc:
        client.wallet()
    assert exc.value.http_status == 500 and exc.value.kind is ec.ErrorKind.RETRYABLE


# ---------------------------------------------------------------- WebSocket: own book, faults, watchdog
def server_top(paper) -> tuple[float, float]:
    book = paper.exchange.replay.book
    return paper.call(lambda: (book.best_bid(), book.best_ask()))


def in_sync(stream: ec.MarketStream, paper) -> bool:
    try:
        return stream.top() == server_top(paper)
    except ec.BookOutOfSync:
        return False


@pytest.fixture
def market(paper, client):
    trades: list = []
    stream = client.market_stream(on_trades=trades.extend, resync_after=0.2, ping_interval=5, ping_timeout=2)
    stream.trades = trades
    stream.start()
    assert wait_until(lambda: stream.ready and stream.book_valid)
    yield stream
    stream.close()


def test_market_stream_keeps_its_own_sequence_checked_book(paper, market):
    assert in_sync(market, paper)
    for _ in range(4):
        paper.advance(2)
        assert wait_until(lambda: in_sync(market, paper))
    assert market.book.gaps == 0 and market.bad_messages == 0
    assert market.trades and {"p", "v", "S", "T"} <= set(market.trades[-1])
    stats = market.stats(5)
    assert (stats.best_bid, stats.best_ask) == server_top(paper) and stats.spread == pytest.approx(0.02)
    assert market.book_ts == START_MS + 5000 - 1  # matching-engine time (cts) of the dip, the last change


def test_kline_subscription_delivers_closed_candles(paper, client):
    candles: list = []
    stream = client.market_stream(kline_interval=1, on_kline=candles.extend, ping_interval=5, ping_timeout=2)
    stream.start()
    try:
        assert wait_until(lambda: stream.ready and stream.acks == 3)
        paper.advance(65)
        assert wait_until(lambda: any(c["confirm"] for c in candles))
        closed = next(c for c in candles if c["confirm"])
        assert closed["start"] == START_MS and closed["interval"] == "1" and closed["low"] == "99.51"
    finally:
        stream.close()


@pytest.mark.parametrize("how", ["abort", "close"])
def test_ws_drop_reconnects_and_resyncs_the_book(paper, market, how):
    paper.call(paper.exchange.drop_ws, "public", how)
    assert wait_until(lambda: market.reconnects + market.rebuilds >= 1 and market.ready and market.book_valid)
    paper.advance(6)  # the market moved while we reconnected: the new snapshot carries it
    assert wait_until(lambda: in_sync(market, paper))
    assert market.book.gaps == 0


def test_watchdog_rebuilds_a_stream_pybit_gave_up_on(paper, market):
    market._ws.handle_error = False  # pybit's own reconnect disabled: the same state as "gave up"
    paper.call(paper.exchange.drop_ws, "public", "abort")
    assert wait_until(lambda: not market.connected)
    watchdog = ec.StreamWatchdog([market], interval=0.05)
    assert watchdog.check_once() == [("linear", "disconnected")]
    assert market.rebuilds == 1 and wait_until(lambda: market.ready and market.book_valid)
    paper.advance(3)
    assert wait_until(lambda: in_sync(market, paper))
    assert watchdog.check_once() == []


def test_u1_reset_resets_the_book_to_the_new_snapshot(paper, market):
    paper.advance(2)
    resets, snapshots = market.book.resets, market.book.counters()["snapshots"]
    set_fault(paper, book_reset=True)
    paper.advance(4)  # the u=1 snapshot carries the dip's prices; deltas continue from u=2
    assert wait_until(lambda: market.book.resets == resets + 1 and in_sync(market, paper))
    assert market.book.counters()["snapshots"] == snapshots + 1
    assert market.book.gaps == 0 and market.rebuilds == 0


def test_out_of_order_push_invalidates_the_book_until_a_resync(paper, market):
    set_fault(paper, reorder_pushes=1, push_topic=market.book_topic)
    paper.advance(14)  # three book changes: the dip is held back and arrives after the step to 100.49
    assert wait_until(lambda: market.book.gaps == 1)
    assert not market.book_valid
    with pytest.raises(ec.BookOutOfSync):
        market.top()
    assert wait_until(lambda: market.health() == "book_invalid")
    watchdog = ec.StreamWatchdog([market])
    assert watchdog.check_once() == [("linear", "book_invalid")]
    assert wait_until(lambda: in_sync(market, paper))


def test_duplicated_push_is_ignored_without_a_resync(paper, market):
    set_fault(paper, duplicate_pushes=1, push_topic=market.book_topic)
    paper.advance(6)
    assert wait_until(lambda: market.book.counters()["stale"] == 1 and in_sync(market, paper))
    assert market.book.gaps == 0 and market.book_valid and market.top()[0] == 99.49


def test_a_push_that_is_not_utf8_is_refused_and_the_stream_rebuilt(paper, market):
    """The frame check the client keeps (a strict decode, not websocket-client's Python loop) still refuses it."""
    set_fault(paper, invalid_utf8_pushes=1)
    paper.advance(6)
    assert wait_until(lambda: not market.connected and market.health() != "ok")
    assert market.trades == [], "nothing of the refused frame reached the handlers"
    watchdog = ec.StreamWatchdog([market], interval=0.05).start()
    try:
        assert wait_until(lambda: market.rebuilds >= 1 and in_sync(market, paper), timeout=10)
    finally:
        watchdog.stop()


def test_bad_frames_and_failing_callbacks_do_not_kill_the_stream(paper, client, caplog):
    def explode(rows):
        raise RuntimeError("user handler bug")
    stream = client.market_stream(on_trades=explode, ping_interval=5, ping_timeout=2).start()
    try:
        assert wait_until(lambda: stream.ready and stream.book_valid)
        stream._ws._on_message("{not json")                                   # undecodable frame
        stream._ws._on_message('{"topic": "orderbook.50.%s", "type": "delta"}' % SYMBOL)  # no data
        stream._ws._on_message("[1, 2]")                                      # not an object
        assert stream.bad_messages == 3
        paper.advance(6)  # trades reach the failing handler; the book keeps updating through the dip
        assert wait_until(lambda: "user callback on_trades failed" in caplog.text)
        assert wait_until(lambda: in_sync(stream, paper) and stream.top()[0] == 99.49)
        assert stream.connected and stream.health() == "ok" and stream.bad_messages == 3
    finally:
        stream.close()


def test_silent_stream_is_rebuilt_by_the_watchdog(paper):
    stream = make_client(paper, ws_stale_after="300ms").market_stream(ping_interval=5, ping_timeout=2).start()
    assert stream.stale_after == 0.3
    watchdog = ec.StreamWatchdog([stream], interval=0.05).start()
    try:
        assert wait_until(lambda: stream.rebuilds >= 1, timeout=5)  # no pushes for 0.3 s: rebuilt
        assert wait_until(lambda: stream.book_valid)
    finally:
        watchdog.stop()
        stream.close()


def test_private_stream_reconnects_and_reauthenticates(paper, client):
    private = client.private_stream().start()
    try:
        assert wait_until(lambda: private.ready and private.authenticated)
        paper.call(paper.exchange.drop_ws, "private", "abort")
        assert wait_until(lambda: private.reconnects >= 1 and private.ready and private.authenticated)
        ack = client.place_order("after-drop", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
        assert private.wait_for(lambda s: s.orders.get(ack.order_link_id, {}).get("orderStatus") == "New", 5)
    finally:
        private.close()


def test_private_stream_with_a_wrong_secret_reports_unauthenticated(paper, caplog):
    c = make_client(paper, secret="not-the-secret")
    private = c.private_stream(auth_timeout=0.3).start()
    try:
        assert wait_until(lambda: private.health() == "unauthenticated", timeout=5)
        assert "private stream: auth refused: Signature verification failed" in caplog.text
        assert not private.authenticated and not private.ready
    finally:
        private.close()


def test_secrets_never_reach_logs_or_exception_text(paper, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    cfg = GlobalConfig()
    cfg.symbol, cfg.live.mode, cfg.live.request_timeout = SYMBOL, "paper", "1s"
    cfg.live.keys_file, cfg.live.keys_profile = paper_keys(paper, tmp_path), "paper"
    c = ec.ExchangeClient.from_config(cfg, env={})
    texts: list[str] = []
    c.startup_checks()
    private = c.private_stream().start()
    market = c.market_stream(ping_interval=5, ping_timeout=2).start()
    try:
        assert wait_until(lambda: private.ready and private.authenticated and market.ready)
        set_fault(paper, lose_acks=1, http_5xx=1, rate_limit_burst=1)
        c.place_order("secret-test", "Buy", 0.1, price=99.0, time_in_force="PostOnly")
        paper.advance(3)
        for call in (lambda: c.request("place_order", raw_order(qty="0.0005")),
                     lambda: c.cancel_order(order_link_id="nope"),
                     lambda: make_client(paper, secret=SECRET + "x").positions(),
                     lambda: ec.load_credentials(write_keys(tmp_path, '{"profiles": {"p": {"api_key": "k", '
                                                                       '"api_secret": "' + SECRET + '"'), "p")):
            with pytest.raises(Exception) as exc:
                call()
            texts += [str(exc.value), repr(exc.value)]
        set_fault(paper, time_skew_ms=-60000)
        with pytest.raises(ec.ClockSkewError) as exc:
            c.wallet()
        texts += [str(exc.value), repr(exc.value), repr(c.creds), repr(c.endpoints)]
    finally:
        private.close()
        market.close()
    captured = {r.name.split(".")[0] for r in caplog.records}
    assert {"pybit", "exchange_client"} <= captured, captured   # their DEBUG output was captured
    for text in texts + [caplog.text] + [str(r.args) for r in caplog.records]:
        assert SECRET not in text


def paper_keys(paper, tmp_path) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"profiles": {"paper": {"api_key": KEY, "api_secret": SECRET, "url": paper.url}}}))
    return str(path)


def test_check_cli_reports_rules_and_masks_the_key(paper, tmp_path, capsys):
    args = ["check", "--mode", "paper", "--symbol", SYMBOL, "--keys-file", paper_keys(paper, tmp_path),
            "--keys-profile", "paper"]
    assert ec.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert (report["tick_size"], report["min_notional"], report["key"]) == ("0.01", "5", "pape…")
    assert report["wallet"]["equity"] == 10000.0 and report["open_orders"] == 0
    paper.call(lambda: paper.exchange.permissions.update({"Wallet": ["Withdraw"]}))
    assert ec.main(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("check failed:") and "Wallet:Withdraw" in out and SECRET not in out


# ---------------------------------------------------------------- private stream: duplicated and late pushes
def order_row(status: str, updated: int, cum: str = "0", **kw) -> dict:
    return {"orderLinkId": "ps-a", "orderId": "o-1", "orderStatus": status, "updatedTime": str(updated),
            "cumExecQty": cum, **kw}


@pytest.mark.parametrize("old,new,verdict", [
    (None, order_row("New", 1), ""),
    (order_row("New", 1), order_row("New", 1), "duplicate"),
    (order_row("New", 1), order_row("New", 2, price="98.50"), ""),                   # an amend
    (order_row("New", 2, price="98.50"), order_row("New", 1), "stale: updatedTime"),
    (order_row("PartiallyFilled", 5, "0.2"), order_row("PartiallyFilled", 5, "0.1"), "stale: cumExecQty"),
    (order_row("Cancelled", 5, "0.1"), order_row("PartiallyFilled", 5, "0.1"), "stale: PartiallyFilled after"),
    (order_row("Cancelled", 5), order_row("New", 6), "stale: New after the final status Cancelled"),
    (order_row("Filled", 5, "0.1"), order_row("New", 5), "stale: cumExecQty"),
    (order_row("PartiallyFilled", 5, "0.1"), order_row("Cancelled", 5, "0.1"), ""),
    (order_row("Filled", 5, "0.1"), order_row("Filled", 6, "0.1", cancelType="CancelByUser"), ""),  # cancel/fill race
    (order_row("Filled", 5, "0.1"), order_row("Filled", 4, "0.1"), "stale: updatedTime"),
    (order_row("Triggered", 5), order_row("New", 5), ""),
    (order_row("New", 5), order_row("Triggered", 5), "stale: Triggered after New in the same millisecond"),
    (order_row("New", 5), order_row("Untriggered", 5), "stale: Untriggered after New"),
])
def test_order_rule_drops_repeats_and_anything_older_than_the_stored_row(old, new, verdict):
    reason = ec.order_drop_reason(old, new)
    assert reason.startswith(verdict) and bool(reason) == bool(verdict)


def position_row(seq: int, updated: int, size: str = "0.1") -> dict:
    return {"positionIdx": 0, "seq": seq, "updatedTime": str(updated), "size": size}


@pytest.mark.parametrize("old,new,verdict", [
    (None, position_row(1, 1), ""),
    (position_row(3, 7), position_row(3, 7), "duplicate"),
    (position_row(3, 7, "0.1"), position_row(4, 8, "0"), ""),
    (position_row(4, 8, "0"), position_row(3, 7, "0.1"), "stale: seq 3 < stored 4"),
    (position_row(4, 8, "0"), position_row(4, 6, "0.1"), "stale: updatedTime 6 < stored 8"),
    (position_row(4, 8, "0"), position_row(4, 9, "0"), ""),  # a stop set: same seq, newer time
])
def test_position_rule_orders_by_seq_then_updated_time(old, new, verdict):
    reason = ec.position_drop_reason(old, new)
    assert reason.startswith(verdict) and bool(reason) == bool(verdict)


@pytest.mark.parametrize("old,new,verdict", [
    (None, (5, {"totalEquity": "1"}), ""),
    ((5, {"totalEquity": "1"}), (5, {"totalEquity": "1"}), "duplicate"),
    ((5, {"totalEquity": "1"}), (4, {"totalEquity": "2"}), "stale: creationTime 4 < stored 5"),
    ((5, {"totalEquity": "1"}), (5, {"totalEquity": "2"}), ""),
    ((5, {"totalEquity": "1"}), (6, {"totalEquity": "1"}), ""),
])
def test_wallet_rule_orders_by_creation_time(old, new, verdict):
    reason = ec.wallet_drop_reason(old, new)
    assert reason.startswith(verdict) and bool(reason) == bool(verdict)


def offline_private(**kw) -> ec.PrivateStream:
    """A private stream that never connects: pushes are fed to it by hand."""
    return ec.PrivateStream(ec.Endpoints(), ec.Credentials(KEY, SECRET), stale_after=30.0, **kw)


def push(stream: ec.PrivateStream, topic: str, rows: list, created: int = 1) -> None:
    stream._on_topic({"id": "x", "topic": topic, "creationTime": created, "data": rows})


def test_stream_applies_each_row_once_and_tells_what_it_dropped_and_why(caplog):
    caplog.set_level(logging.INFO)
    seen: list[tuple[str, list]] = []
    stream = offline_private(on_message=lambda topic, rows: seen.append((topic, rows)))
    fill = {"execId": "e1", "orderLinkId": "ps-a", "execQty": "0.1", "seq": 7}
    late = {"execId": "e0", "orderLinkId": "ps-a", "execQty": "0.05", "seq": 6}
    push(stream, "execution", [fill])
    push(stream, "execution", [dict(fill), late])
    assert [e["execId"] for e in stream.executions] == ["e1", "e0"]  # a late fill is still a fill
    push(stream, "order.linear", [order_row("Filled", 9, "0.15")])
    push(stream, "order", [order_row("PartiallyFilled", 8, "0.05")])
    push(stream, "position", [position_row(7, 9)])
    push(stream, "position", [position_row(6, 8, "0.05")])
    push(stream, "position", [position_row(7, 9)])   # Bybit re-pushes it on every order create/amend/cancel
    push(stream, "wallet", [{"accountType": "UNIFIED", "totalEquity": "10"}], created=9)
    push(stream, "wallet", [{"accountType": "UNIFIED", "totalEquity": "11"}], created=8)
    assert stream.orders["ps-a"]["orderStatus"] == "Filled" and stream.positions[0]["seq"] == 7
    assert stream.wallet["totalEquity"] == "10"
    assert stream.dropped == {("execution", "duplicate"): 1, ("order", "stale"): 1, ("position", "stale"): 1,
                              ("position", "duplicate"): 1, ("wallet", "stale"): 1}
    assert seen == [("execution", [fill]), ("execution", [late]), ("order", [order_row("Filled", 9, "0.15")]),
                    ("position", [position_row(7, 9)]), ("wallet", [stream.wallet])]
    assert "dropped execution row orderLinkId=ps-a execId=e1 seq=7 (duplicate: execId already applied)" in caplog.text
    assert ("dropped order row orderLinkId=ps-a orderId=o-1 orderStatus=PartiallyFilled cumExecQty=0.05 "
            "updatedTime=8 (stale: updatedTime 8 < stored 9)") in caplog.text
    assert "dropped wallet row accountType=UNIFIED (stale: creationTime 8 < stored 9)" in caplog.text
    assert "(duplicate: this row is already applied)" not in caplog.text   # the routine position re-push: counted


def test_remembered_exec_ids_are_bounded():
    stream = offline_private()
    stream.seen_exec_ids = 2
    push(stream, "execution", [{"execId": f"e{i}", "execQty": "0.1"} for i in range(3)])
    push(stream, "execution", [{"execId": "e2"}, {"execId": "e1"}])
    assert len(stream._exec_ids) == 2 and [e["execId"] for e in stream.executions] == ["e0", "e1", "e2"]


def own_rows(stream: ec.PrivateStream, link: str) -> list:
    with stream.lock:
        return [e for e in stream.executions if e["orderLinkId"] == link]


def test_duplicated_pushes_leave_one_execution_per_fill(paper, client):
    rows: list = []
    private = client.private_stream(on_message=lambda topic, data: rows.extend(data if topic == "execution" else []))
    private.start()
    try:
        assert wait_until(lambda: private.ready and private.authenticated)
        set_fault(paper, duplicate_pushes=1000)  # every private push arrives twice
        ack = client.place_order("dup-mkt", "Buy", 0.1, order_type="Market")
        assert private.wait_for(lambda s: s.dropped[("wallet", "duplicate")] == 1, 5)  # the fill's last push
        fills = own_rows(private, ack.order_link_id)
        assert len(fills) == 1 and sum(Decimal(e["execQty"]) for e in fills) == Decimal("0.1")
        assert rows == fills  # the callback saw the fill once too
        assert private.dropped[("execution", "duplicate")] == 1 and private.dropped[("order", "duplicate")] == 1
        assert private.orders[ack.order_link_id]["orderStatus"] == "Filled" and pos_size(private) == 0.1
    finally:
        private.close()


def test_late_order_and_position_pushes_never_overwrite_newer_state(paper, client):
    private = client.private_stream().start()
    try:
        assert wait_until(lambda: private.ready and private.authenticated)
        set_fault(paper, reorder_pushes=2)  # the create's order (New) and position (flat) pushes come late
        ack = client.place_order("late-entry", "Buy", 0.1, price=99.60, time_in_force="PostOnly")
        paper.advance(6)  # the dip fills it: Filled and the 0.1 position arrive, then the held older pushes
        assert private.wait_for(lambda s: s.dropped[("order", "stale")] == 1 and
                                s.dropped[("position", "stale")] == 1, 5)
        assert private.orders[ack.order_link_id]["orderStatus"] == client.find_order(ack.order_link_id)["orderStatus"]
        assert private.orders[ack.order_link_id]["orderStatus"] == "Filled"
        assert pos_size(private) == float(client.positions()[0]["size"]) == 0.1
    finally:
        private.close()


# ---------------------------------------------------------------- pybit internals we rely on (pinned 5.17.0)
# Each override of a private pybit method, and each pybit internal our code reads or calls. A pybit upgrade
# that renames, re-signs or stops calling one of them fails here by name: re-check the override, then update.
OVERRIDES = {ec._SyncedHTTP: {"_prepare_headers"},
             ec._GuardedWebSocket: {"__init__", "_connect", "_reset", "_on_message", "_on_pong"}}


def test_every_override_of_a_pybit_method_is_listed_here():
    for cls, guarded in OVERRIDES.items():
        base = cls.__mro__[1]
        assert {name for name in vars(cls) if hasattr(base, name) and callable(vars(cls)[name])} == guarded


@pytest.mark.parametrize("cls,name", [(c, n) for c, names in OVERRIDES.items() for n in sorted(names - {"__init__"})])
def test_overrides_keep_the_signature_pybit_calls_them_with(cls, name):
    ours, theirs = inspect.signature(getattr(cls, name)), inspect.signature(getattr(cls.__mro__[1], name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def flat(code: str) -> str:
    return " ".join(code.split())


# (pybit function, code it must still contain): the call sites and state our overrides depend on
PYBIT_CALL_SITES = [
    (unified_trading.HTTP._submit_request, "headers = self._prepare_headers(req_params, recv_window) if auth else {}"),
    (unified_trading.HTTP._submit_request, "response = self.client.send(request, timeout=self.timeout)"),
    (unified_trading.HTTP._submit_request, "retries_attempted = self.max_retries"),
    (unified_trading.HTTP._handle_response, "if error_code in self.retry_codes:"),
    (unified_trading.HTTP._auth, "param_str = str(timestamp) + self.api_key + str(recv_window) + payload"),
    (unified_trading.WebSocket.__init__, "self._connect(self.WS_URL)"),
    (unified_trading.WebSocket._connect, "self.endpoint = url.format(SUBDOMAIN=subdomain, DOMAIN=domain, TLD=tld)"),
    (unified_trading.WebSocket._connect, "on_message=lambda ws, msg: self._on_message(msg)"),
    (unified_trading.WebSocket._connect, "on_pong=lambda ws, *args: self._on_pong()"),
    (unified_trading.WebSocket._on_error, "self._reset() self._connect(self.endpoint)"),
    (unified_trading.WebSocket._on_message, "self.callback(message)"),
    (unified_trading.WebSocket._on_message, "if self._is_custom_pong(message):"),
    (unified_trading.WebSocket.exit, "self.exited = True"),
]


@pytest.mark.parametrize("fn,code", PYBIT_CALL_SITES, ids=[f"{f.__qualname__}-{i}" for i, (f, _) in
                                                          enumerate(PYBIT_CALL_SITES)])
def test_pybit_still_calls_our_overrides_and_keeps_the_state_they_use(fn, code):
    assert flat(code) in flat(inspect.getsource(fn)), f"pybit changed {fn.__qualname__}: re-check exchange_client"


# every pybit HTTP method exchange_client calls by name: each builds its URL from the `endpoint` we set
CALLED_HTTP_METHODS = sorted(set(re.findall(r'"((?:get|place|amend|cancel|set|switch)_[a-z_]+)"',
                                              inspect.getsource(ec))))


@pytest.mark.parametrize("name", CALLED_HTTP_METHODS)
def test_pybit_http_methods_build_urls_from_the_endpoint_we_set(name):
    assert callable(getattr(unified_trading.HTTP, name))
    assert 'path=f"{self.endpoint}' in flat(inspect.getsource(getattr(unified_trading.HTTP, name)))


def test_pybit_constructors_take_the_arguments_we_pass():
    http_fields = {f.name for f in dataclasses.fields(unified_trading.HTTP)}
    assert {"testnet", "demo", "timeout", "max_retries", "force_retry", "retry_codes", "recv_window",
            "api_key", "api_secret"} <= http_fields
    ws_params = set(inspect.signature(_websocket_stream._WebSocketManager.__init__).parameters)
    assert {"testnet", "demo", "ping_interval", "ping_timeout", "api_key", "api_secret",
            "private_auth_expire"} <= ws_params
    assert "channel_type" in inspect.signature(unified_trading.WebSocket.__init__).parameters
    assert 'kwargs.pop("callback_function")' in inspect.getsource(_websocket_stream._V5WebSocketManager.__init__)
    for template in (unified_trading.PUBLIC_WSS, unified_trading.PRIVATE_WSS):  # what _connect rewrites
        assert template.startswith("wss://{SUBDOMAIN}") and "/v5/" in template
    assert unified_trading.WebSocket._is_custom_pong({"op": "pong"})


def test_requests_are_signed_by_our_prepare_headers(paper, client):
    positions = {"category": "linear", "symbol": SYMBOL}
    client.http.time_offset_ms = -60_000.0  # a timestamp a minute old can only come from our override
    with pytest.raises(ec.TimestampError):
        client._send("get_positions", positions)
    client.http.time_offset_ms = 0.0
    assert client._send("get_positions", positions)["result"]["list"]


def test_streams_reach_the_base_url_and_see_frames_and_pongs_through_our_hooks(paper, client):
    stream = client.market_stream(ping_interval=0.5, ping_timeout=0.4).start()
    ws = stream._ws
    our_on_pong, silences = ws._on_pong, []

    def on_pong() -> None:  # websocket-client calls pybit's lambda, which looks _on_pong up on the instance
        stream._last_frame -= 100.0  # pretend 100 s of silence: only our hook's touch can undo it
        our_on_pong()
        silences.append(stream.silence())
    ws._on_pong = on_pong
    try:
        assert ws.endpoint == paper.url.replace("http", "ws") + "/v5/public/linear"  # _connect rewrote the host
        assert wait_until(lambda: stream.ready and stream.book_valid)          # frames reached _on_message
        assert wait_until(lambda: len(silences) >= 2, timeout=5)                # pong frames reach _on_pong
        assert max(silences) < 50.0                                             # and count as liveness
        paper.call(paper.exchange.drop_ws, "public", "abort")
        assert wait_until(lambda: stream.reconnects >= 1 and stream.ready)  # pybit's reconnect → _reset
    finally:
        stream.close()
    assert not ws.is_connected() and ws.handle_error is False  # shutdown: pybit will not reconnect
