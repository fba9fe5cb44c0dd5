"""exchange_client: rounding, taxonomy, keys and permissions (pure), then the real pybit against paper_exchange."""
from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import exchange_client as ec
from config import GlobalConfig, InstrumentConfig

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
    assert out <= q
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
