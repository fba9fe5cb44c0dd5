"""paper_exchange: the real pybit 5.17.0 client against a local server replaying small files on 127.0.0.1.

Market files come from tests/paper_market.py: a book per second around a scripted mid (bids mid-1tick-k,
asks mid+1tick+k with size 1+k) and a 0.5 taker-buy trade at the ask each second unless a test scripts
its own trades. Every expected number below is derived from that layout.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from pybit.exceptions import FailedRequestError, InvalidRequestError
from pybit.unified_trading import HTTP
import pybit.unified_trading as ut

import grid
from config import InstrumentConfig, VenueConfig
from matching import ExchangeError, MatchingEngine, load_instrument
from paper_exchange import ExchangeThread, MarketReplay, build_exchange, parse_start, trade_prints
from paper_market import START_MS, SYMBOL, write_market

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
ROOT = Path(__file__).resolve().parents[1]
FLAT = [100.0] * 120


@pytest.fixture
def venue(tmp_path):
    """Start exchanges on free ports for one test; all are stopped afterwards."""
    started: list[ExchangeThread] = []

    def make(mids=FLAT, trades=None, balance: float = 10000.0, instrument: dict | None = None, step_s: int = 1,
             **kw):
        folder = write_market(tmp_path / f"m{len(started)}", mids, trades, instrument=instrument, step_s=step_s)
        thread = ExchangeThread(build_exchange(folder, balance=balance, **kw)).__enter__()
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.__exit__(None, None, None)


def client(venue_thread: ExchangeThread, **kw) -> HTTP:
    session = HTTP(api_key=kw.pop("api_key", "paper"), api_secret=kw.pop("api_secret", "paper"),
                   retry_delay=0.05, **kw)
    session.endpoint = venue_thread.url
    return session


def order(session: HTTP, link: str) -> dict:
    rows = session.get_open_orders(category="linear", symbol=SYMBOL, orderLinkId=link)["result"]["list"]
    assert len(rows) == 1
    return rows[0]


def position(session: HTTP, idx: int = 0) -> dict:
    rows = session.get_positions(category="linear", symbol=SYMBOL)["result"]["list"]
    return next(r for r in rows if r["positionIdx"] == idx)


def wallet(session: HTTP) -> dict:
    return session.get_wallet_balance(accountType="UNIFIED", coin="USDT")["result"]["list"][0]


def code_of(call) -> int:
    with pytest.raises(InvalidRequestError) as info:
        call()
    return info.value.status_code


# ------------------------------------------------------------------ market data
def test_market_endpoints_serve_the_replayed_book_trades_and_candles(venue):
    mids = [100.0 + 0.01 * i for i in range(400)]
    ex = venue(mids)
    s = client(ex)
    book = s.get_orderbook(category="linear", symbol=SYMBOL, limit=3)["result"]
    assert book["b"] == [["99.99", "1.000"], ["99.98", "2.000"], ["99.97", "3.000"]]
    assert book["a"] == [["100.01", "1.000"], ["100.02", "2.000"], ["100.03", "3.000"]]
    assert book["u"] == 1 and book["ts"] == START_MS
    ex.advance(300.5)  # books at whole seconds, trades at +0.5 s: through the trade of second 300
    book = s.get_orderbook(category="linear", symbol=SYMBOL, limit=1)["result"]
    assert book["b"] == [["102.99", "1.000"]] and book["u"] == 301
    candles = s.get_kline(category="linear", symbol=SYMBOL, interval="5", limit=2)["result"]["list"]
    # newest first: the 00:05 candle holds only the trade of second 300; the 00:00 one seconds 0..299
    assert candles[0] == [str(START_MS + 300_000), "103.01", "103.01", "103.01", "103.01", "0.500", "51.505"]
    first = candles[1]
    assert first[:5] == [str(START_MS), "100.01", "103.00", "100.01", "103.00"]
    assert first[5] == "150.000"
    assert float(first[6]) == pytest.approx(sum((100.01 + 0.01 * i) * 0.5 for i in range(300)))
    trades = s.get_public_trade_history(category="linear", symbol=SYMBOL, limit=2)["result"]["list"]
    assert [t["price"] for t in trades] == ["103.01", "103.00"] and trades[0]["side"] == "Buy"
    ticker = s.get_tickers(category="linear", symbol=SYMBOL)["result"]["list"][0]
    assert (ticker["lastPrice"], ticker["bid1Price"], ticker["ask1Price"]) == ("103.01", "102.99", "103.01")
    assert float(ticker["volume24h"]) == pytest.approx(0.5 * 301)
    info = s.get_instruments_info(category="linear", symbol=SYMBOL)["result"]["list"][0]
    assert info["priceFilter"]["tickSize"] == "0.01" and info["lotSizeFilter"]["minNotionalValue"] == "5"


def test_instrument_json_rules_are_enforced(venue, tmp_path):
    ex = venue(instrument={"tickSize": 0.05, "qtyStep": 0.1, "minOrderQty": 0.2, "minNotionalValue": 50})
    s = client(ex)
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="1", price="99.03")) == 10001  # not a 0.05 multiple
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="0.15", price="99.00")) == 10001  # not a 0.1 multiple
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="0.1", price="99.00")) == 10001  # below min qty 0.2
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="0.4", price="99.00")) == 110094  # 39.6 < 50 notional
    assert s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="0.6",
                         price="99.00")["retCode"] == 0
    defaults = load_instrument(tmp_path / "nothing-here", "XUSDT")
    cfg = InstrumentConfig()
    assert (defaults.symbol, defaults.tick_size, defaults.qty_step, defaults.min_qty, defaults.min_notional) == (
        "XUSDT", Decimal(str(cfg.tick_size)), Decimal(str(cfg.qty_step)), Decimal(str(cfg.min_qty)),
        Decimal(str(cfg.min_notional)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "instrument.json").write_text('{"symbol": "XUSDT", "tickSize": "abc"}')
    with pytest.raises(ValueError, match="instrument.json"):
        load_instrument(bad, "XUSDT")


# ------------------------------------------------------------------ orders and fills
def test_market_order_walks_the_book_with_taker_fee_and_equity_marks_to_mid(venue):
    ex = venue(balance=1000.0)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="2.5", orderLinkId="m1")
    o = order(s, "m1")
    # asks: 100.01 x1, 100.02 x2 -> 1 @ 100.01 + 1.5 @ 100.02
    value = 100.01 * 1 + 100.02 * 1.5
    assert o["orderStatus"] == "Filled" and o["cumExecQty"] == "2.500"
    assert float(o["cumExecValue"]) == pytest.approx(value)
    assert float(o["avgPrice"]) == pytest.approx(value / 2.5)
    fills = s.get_executions(category="linear", symbol=SYMBOL, orderLinkId="m1")["result"]["list"]
    assert sorted((f["execPrice"], f["execQty"], f["isMaker"]) for f in fills) == [
        ("100.01", "1.000", False), ("100.02", "1.500", False)]
    fee = value * 0.00055
    assert sum(float(f["execFee"]) for f in fills) == pytest.approx(fee)
    pos = position(s)
    assert (pos["side"], pos["size"]) == ("Buy", "2.500")
    assert float(pos["avgPrice"]) == pytest.approx(value / 2.5)
    upnl = (100.0 - value / 2.5) * 2.5
    w = wallet(s)
    assert float(w["totalWalletBalance"]) == pytest.approx(1000.0 - fee)
    assert float(w["totalPerpUPL"]) == pytest.approx(upnl)
    assert float(w["totalEquity"]) == pytest.approx(1000.0 - fee + upnl)
    assert float(w["totalInitialMargin"]) == pytest.approx(2.5 * 100.0 / 10)


def test_closing_realises_pnl_net_of_both_fees(venue):
    ex = venue([100.0] * 10 + [101.0] * 50)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1", orderLinkId="open")
    ex.advance(20)
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="1", reduceOnly=True,
                  orderLinkId="close")
    gross = 100.99 - 100.01
    fees = (100.01 + 100.99) * 0.00055
    rows = s.get_closed_pnl(category="linear", symbol=SYMBOL)["result"]["list"]
    assert len(rows) == 1
    assert s.get_closed_pnl(category="linear", symbol=SYMBOL, startTime=START_MS + 21_000)["result"]["list"] == []
    assert float(rows[0]["closedPnl"]) == pytest.approx(gross - fees)
    assert (rows[0]["avgEntryPrice"], rows[0]["avgExitPrice"]) == ("100.01", "100.99")
    assert position(s)["size"] == "0"
    w = wallet(s)
    assert float(w["totalWalletBalance"]) == pytest.approx(10000.0 + gross - fees)
    assert float(w["coin"][0]["cumRealisedPnl"]) == pytest.approx(gross - fees)


def test_resting_limit_fills_only_when_trades_print_through_and_partially_by_trade_size(venue):
    trades = [(1, "Sell", 0.4, 99.95), (2, "Sell", 0.4, 99.90), (3, "Sell", 0.3, 99.89), (4, "Sell", 0.5, 99.80)]
    ex = venue(trades=trades)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="0.6", price="99.90",
                  orderLinkId="bid")
    ex.advance(2.9)  # trades at 99.95 (above) and 99.90 (at the price, no trade-through)
    assert order(s, "bid")["orderStatus"] == "New"
    ex.advance(1)  # 0.3 prints through at 99.89
    o = order(s, "bid")
    assert (o["orderStatus"], o["cumExecQty"], o["leavesQty"]) == ("PartiallyFilled", "0.300", "0.300")
    ex.advance(1)
    o = order(s, "bid")
    assert (o["orderStatus"], o["cumExecQty"], o["avgPrice"]) == ("Filled", "0.600", "99.9")
    fills = s.get_executions(category="linear", symbol=SYMBOL, orderLinkId="bid")["result"]["list"]
    assert all(f["isMaker"] and f["execPrice"] == "99.90" for f in fills)
    assert sum(float(f["execFee"]) for f in fills) == pytest.approx(99.90 * 0.6 * 0.0002)


def test_book_moving_through_a_resting_order_fills_it_as_maker_at_its_price(venue):
    ex = venue([100.0] * 5 + [99.0] * 20)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="3", price="99.50",
                  orderLinkId="bid")
    ex.advance(4)
    assert order(s, "bid")["orderStatus"] == "New"
    ex.advance(2)  # asks now 99.01.. : 1+2 lots at or below 99.50 -> the whole 3 fill at 99.50
    o = order(s, "bid")
    assert (o["orderStatus"], o["avgPrice"]) == ("Filled", "99.5")
    assert position(s)["size"] == "3.000"


def test_crossing_limit_takes_liquidity_up_to_its_price_then_rests(venue):
    ex = venue()
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="5", price="100.02",
                  orderLinkId="x")
    o = order(s, "x")
    assert (o["orderStatus"], o["cumExecQty"], o["leavesQty"]) == ("PartiallyFilled", "3.000", "2.000")
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="5", price="100.02",
                  timeInForce="IOC", orderLinkId="ioc")
    o = order(s, "ioc")
    assert (o["orderStatus"], o["cumExecQty"]) == ("Cancelled", "3.000")
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="5", price="100.02",
                  timeInForce="FOK", orderLinkId="fok")
    o = order(s, "fok")
    assert (o["orderStatus"], o["cumExecQty"], o["rejectReason"]) == ("Cancelled", "0.000", "EC_CancelForNoFullFill")


def test_post_only_that_would_cross_is_accepted_then_cancelled(venue):
    ex = venue()
    s = client(ex)
    ack = s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1", price="100.01",
                        timeInForce="PostOnly", orderLinkId="po")
    assert ack["retCode"] == 0 and ack["result"]["orderLinkId"] == "po"
    o = order(s, "po")
    assert (o["orderStatus"], o["rejectReason"], o["cumExecQty"]) == ("Cancelled", "EC_PostOnlyWillTakeLiquidity",
                                                                      "0.000")
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1", price="100.00",
                  timeInForce="PostOnly", orderLinkId="po2")
    assert order(s, "po2")["orderStatus"] == "New"
    s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="po2", price="100.05")  # would now cross
    o = order(s, "po2")
    assert (o["orderStatus"], o["rejectReason"]) == ("Cancelled", "EC_PostOnlyWillTakeLiquidity")
    assert position(s)["size"] == "0"


def test_error_codes_match_bybit(venue):
    ex = venue(balance=100.0)
    s = client(ex)
    place = dict(category="linear", symbol=SYMBOL, orderType="Limit", price="99.00")
    assert code_of(lambda: s.place_order(side="Sell", qty="1", reduceOnly=True, **place)) == 110017
    assert code_of(lambda: s.place_order(side="Buy", qty="20", **place)) == 110007  # IM 198 > 100
    assert code_of(lambda: s.place_order(side="Buy", qty="0.01", **place)) == 110094
    assert code_of(lambda: s.place_order(side="Buy", qty="0.0005", **place)) == 10001
    assert code_of(lambda: s.place_order(side="Up", qty="1", **place)) == 10001
    assert code_of(lambda: s.place_order(side="Buy", qty="1", positionIdx=1, **place)) == 10001
    assert code_of(lambda: s.place_order(symbol=SYMBOL, side="Buy", orderType="Limit", qty="1",
                                         price="99.00")) == 10001  # no category
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="0.1", price="110.01")) == 110003  # > mark 100 x 1.1
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Limit",
                                         qty="0.1", price="89.99")) == 110003
    s.place_order(side="Buy", qty="1", orderLinkId="dup", **place)
    assert code_of(lambda: s.place_order(side="Buy", qty="1", orderLinkId="dup", **place)) == 110072
    assert code_of(lambda: s.cancel_order(category="linear", symbol=SYMBOL, orderLinkId="nope")) == 110001
    s.cancel_order(category="linear", symbol=SYMBOL, orderLinkId="dup")
    assert code_of(lambda: s.cancel_order(category="linear", symbol=SYMBOL, orderLinkId="dup")) == 110001
    assert code_of(lambda: s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="dup", qty="2")) == 110001
    assert code_of(lambda: s.set_leverage(category="linear", symbol=SYMBOL, buyLeverage="10",
                                          sellLeverage="10")) == 110043
    assert s.set_leverage(category="linear", symbol=SYMBOL, buyLeverage="5", sellLeverage="5")["retCode"] == 0
    assert position(s)["leverage"] == "5"
    assert code_of(lambda: s.set_trading_stop(category="linear", symbol=SYMBOL, tpslMode="Full", positionIdx=0,
                                              takeProfit="101")) == 10001  # no position


def test_reduce_only_is_truncated_to_the_position(venue):
    ex = venue()
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1")
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="3", reduceOnly=True,
                  orderLinkId="ro")
    o = order(s, "ro")
    assert (o["orderStatus"], o["cumExecQty"], o["cancelType"]) == ("Cancelled", "1.000", "CancelByReduceOnly")
    assert position(s)["size"] == "0"
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1")
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Limit", qty="1", price="101.00",
                  reduceOnly=True, orderLinkId="resting")
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="1")
    o = order(s, "resting")  # the position it could reduce is gone
    assert (o["orderStatus"], o["cancelType"]) == ("Cancelled", "CancelByReduceOnly")


def test_amend_and_cancel_all(venue):
    ex = venue()
    s = client(ex)
    for i in range(3):
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1",
                      price=f"{99 - i}.00", orderLinkId=f"o{i}")
    s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="o0", price="99.50", qty="2")
    o = order(s, "o0")
    assert (o["price"], o["qty"], o["orderStatus"]) == ("99.50", "2.000", "New")
    assert code_of(lambda: s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="o0", price="99.50")) == 10001
    assert code_of(lambda: s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="o0", qty="2000")) == 110007
    s.amend_order(category="linear", symbol=SYMBOL, orderLinkId="o1", price="100.02")  # now crosses: takes 3
    assert order(s, "o1")["orderStatus"] == "Filled"
    done = s.cancel_all_orders(category="linear", symbol=SYMBOL)["result"]["list"]
    assert sorted(d["orderLinkId"] for d in done) == ["o0", "o2"]
    assert s.get_open_orders(category="linear", symbol=SYMBOL)["result"]["list"] == []


# ------------------------------------------------------------------ TP/SL and conditional orders
def test_full_take_profit_closes_the_whole_position_and_deactivates_the_stop(venue):
    mids = [100.0] * 10 + [100.0 + 0.1 * i for i in range(1, 40)]
    ex = venue(mids)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="2", takeProfit="101.00",
                  stopLoss="99.00", orderLinkId="e")
    pos = position(s)
    assert (pos["takeProfit"], pos["stopLoss"]) == ("101.00", "99.00")
    stops = s.get_open_orders(category="linear", symbol=SYMBOL, orderFilter="StopOrder")["result"]["list"]
    assert sorted(o["stopOrderType"] for o in stops) == ["StopLoss", "TakeProfit"]
    assert all(o["orderStatus"] == "Untriggered" for o in stops)
    ex.advance(18)  # last trade 100.81 at second 18: below TP
    assert position(s)["size"] == "2.000"
    ex.advance(2)  # second 20: last 101.01 >= 101.00 -> market close at bid 100.99 (1) and 100.98 (1)
    assert position(s)["size"] == "0"
    hist = {o["stopOrderType"]: o for o in s.get_order_history(category="linear", symbol=SYMBOL)["result"]["list"]
            if o["stopOrderType"]}
    assert hist["TakeProfit"]["orderStatus"] == "Filled" and hist["TakeProfit"]["cumExecQty"] == "2.000"
    assert hist["StopLoss"]["orderStatus"] == "Deactivated"
    pnl = float(s.get_closed_pnl(category="linear", symbol=SYMBOL)["result"]["list"][0]["closedPnl"])
    entry = (100.01 + 100.02) / 2
    exit_value = 100.99 + 100.98
    assert pnl == pytest.approx(exit_value - 2 * entry - (2 * entry + exit_value) * 0.00055)


def test_partial_tpsl_limit_take_profit_per_fill_and_trading_stop(venue):
    mids = [100.0] * 5 + [99.0] * 5 + [99.0 + 0.2 * i for i in range(1, 30)]
    ex = venue(mids)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1", price="99.50",
                  tpslMode="Partial", takeProfit="100.50", tpOrderType="Limit", tpLimitPrice="100.60",
                  stopLoss="98.00", slOrderType="Market", orderLinkId="e")
    ex.advance(6)  # the book drops to 99: entry fills at 99.50 and arms a Partial TP and SL for 1.0
    stops = s.get_open_orders(category="linear", symbol=SYMBOL, orderFilter="StopOrder")["result"]["list"]
    assert sorted((o["stopOrderType"], o["qty"], o["orderType"]) for o in stops) == [
        ("PartialStopLoss", "1.000", "Market"), ("PartialTakeProfit", "1.000", "Limit")]
    assert code_of(lambda: s.set_trading_stop(category="linear", symbol=SYMBOL, tpslMode="Full", positionIdx=0,
                                              takeProfit="0")) == 34040
    ex.advance(10)  # last passes 100.50 at second 13 (99.0+0.2*4 = 99.8.. 100.61 at 18): TP limit rests
    ex.advance(10)
    assert position(s)["size"] == "0"
    tp = next(o for o in s.get_order_history(category="linear", symbol=SYMBOL)["result"]["list"]
              if o["stopOrderType"] == "PartialTakeProfit")
    assert (tp["orderStatus"], tp["avgPrice"], tp["orderType"]) == ("Filled", "100.6", "Limit")


def test_trading_stop_sets_and_fires_a_stop_loss(venue):
    mids = [100.0] * 10 + [100.0 - 0.1 * i for i in range(1, 30)]
    ex = venue(mids, trades=[(i, "Sell", 0.5, round(m - 0.01, 2)) for i, m in enumerate(mids)])
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1")
    assert s.set_trading_stop(category="linear", symbol=SYMBOL, tpslMode="Full", positionIdx=0,
                              stopLoss="99.50")["retCode"] == 0
    assert position(s)["stopLoss"] == "99.50"
    ex.advance(14)  # second 14: last 99.59
    assert position(s)["size"] == "1.000"
    ex.advance(2)  # second 15: last 99.49 <= 99.50
    assert position(s)["size"] == "0"
    fills = s.get_executions(category="linear", symbol=SYMBOL)["result"]["list"]
    assert fills[0]["stopOrderType"] == "StopLoss" and fills[0]["createType"] == "CreateByStopLoss"
    assert fills[0]["execPrice"] == "99.49"  # bid of the second-15 book (mid 99.50)
    week, t = 7 * 86_400_000, int(fills[0]["execTime"])   # Bybit V5: a window of at most 7 days
    assert s.get_executions(category="linear", symbol=SYMBOL, startTime=t - week)["result"]["list"] == fills
    assert s.get_executions(category="linear", symbol=SYMBOL, startTime=t - week - 1)["result"]["list"] \
        == fills[1:]                              # startTime alone: [startTime, startTime + 7 days]
    assert s.get_executions(category="linear", symbol=SYMBOL, endTime=t + week)["result"]["list"] \
        == fills[:1]                              # endTime alone: [endTime - 7 days, endTime]
    with pytest.raises(InvalidRequestError, match="cannot exceed 7 days"):
        s.get_executions(category="linear", symbol=SYMBOL, startTime=t - week - 1, endTime=t)


def test_conditional_order_waits_for_its_trigger(venue):
    mids = [100.0] * 5 + [100.0 + 0.1 * i for i in range(1, 30)]
    ex = venue(mids)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1", triggerPrice="100.50",
                  triggerDirection=1, orderLinkId="brk")
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="2000",
                  triggerPrice="100.50", triggerDirection=1, orderLinkId="huge")  # margin is checked at trigger
    assert order(s, "brk")["orderStatus"] == "Untriggered"
    assert position(s)["size"] == "0"
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1",
                                         triggerPrice="99.00", triggerDirection=1)) == 110092  # mark 100.00
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="1",
                                         triggerPrice="100.50", triggerDirection=2)) == 110093
    ex.advance(8)  # second 8: last 100.31
    assert order(s, "brk")["orderStatus"] == "Untriggered"
    ex.advance(2)  # second 10: last 100.51
    o = order(s, "brk")
    assert (o["orderStatus"], o["avgPrice"]) == ("Filled", "100.51")
    assert order(s, "huge")["orderStatus"] == "Rejected"  # 2000 x 100.5 / 10x leverage > 10,000 equity
    assert position(s)["size"] == "1.000"


def test_hedge_mode_holds_both_sides_and_mode_switch_rules(venue):
    ex = venue()
    s = client(ex)
    assert s.switch_position_mode(category="linear", symbol=SYMBOL, mode=3)["retCode"] == 0
    assert code_of(lambda: s.switch_position_mode(category="linear", symbol=SYMBOL, mode=3)) == 110025
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market",
                                         qty="1")) == 10001  # positionIdx 0 in hedge mode
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1", positionIdx=1)
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="2", positionIdx=2)
    assert (position(s, 1)["side"], position(s, 1)["size"]) == ("Buy", "1.000")
    assert (position(s, 2)["side"], position(s, 2)["size"]) == ("Sell", "2.000")
    assert code_of(lambda: s.switch_position_mode(category="linear", symbol=SYMBOL, mode=0)) == 110024
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="3", positionIdx=1)
    assert position(s, 1)["size"] == "0" and position(s, 2)["size"] == "2.000"  # closing side never flips
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market",
                                         qty="1", positionIdx=1)) == 110017


# ------------------------------------------------------------------ auth, limits and faults
def test_signatures_are_verified_and_the_recv_window_enforced(venue):
    ex = venue()
    bad = client(ex, api_secret="wrong")
    assert code_of(lambda: bad.get_positions(category="linear", symbol=SYMBOL)) == 10004
    stranger = client(ex, api_key="other")
    assert code_of(lambda: stranger.get_positions(category="linear", symbol=SYMBOL)) == 10003
    ex.exchange.faults.time_skew_ms = -60_000
    skewed = client(ex, max_retries=2)
    with pytest.raises(FailedRequestError, match="(?i)retries exceeded"):
        skewed.get_positions(category="linear", symbol=SYMBOL)
    raw = requests.get(ex.url + "/v5/market/time", timeout=5).json()["result"]
    assert int(raw["timeSecond"]) == pytest.approx(time.time() - 60, abs=5)
    ex.exchange.faults.time_skew_ms = 0
    assert client(ex).get_positions(category="linear", symbol=SYMBOL)["retCode"] == 0


def test_rate_limit_answers_10006_with_a_future_reset_and_pybit_retries(venue):
    ex = venue()
    ex.exchange.rate_window_s = 60.0  # Bybit's window is 1 s; a long one keeps a loaded machine deterministic
    s = client(ex, retry_codes={-1}, return_response_headers=True)
    codes = []
    for i in range(11):
        try:
            _, _, headers = s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                          qty="1", price="90.00", orderLinkId=f"r{i}")
            codes.append(0)
        except InvalidRequestError as exc:
            codes.append(exc.status_code)
            reset = int(exc.resp_headers["X-Bapi-Limit-Reset-Timestamp"])
            assert reset > time.time() * 1000
    assert codes[:10] == [0] * 10 and codes[10] == 10006
    assert s.get_positions(category="linear", symbol=SYMBOL)[0]["retCode"] == 0  # limits are per endpoint
    ex.exchange.faults.rate_limit_burst = 2
    started = time.monotonic()
    assert client(ex).get_positions(category="linear", symbol=SYMBOL)["retCode"] == 0
    assert time.monotonic() - started >= 0.3  # two transparent sleeps until the future reset


def test_http_5xx_and_lost_or_delayed_acks(venue):
    ex = venue()
    s = client(ex)
    ex.exchange.faults.http_5xx = 1
    with pytest.raises(FailedRequestError) as info:
        s.get_positions(category="linear", symbol=SYMBOL)
    assert info.value.status_code == 500
    ex.exchange.faults.lose_acks = 1
    with pytest.raises(requests.exceptions.ConnectionError):
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1", price="99.00",
                      orderLinkId="lost")
    assert order(s, "lost")["orderStatus"] == "New"  # the order went through; only the ack was lost
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1",
                                         price="99.00", orderLinkId="lost")) == 110072
    ex.exchange.faults.ack_delay_s = 0.4
    started = time.monotonic()
    s.cancel_order(category="linear", symbol=SYMBOL, orderLinkId="lost")
    assert time.monotonic() - started >= 0.4


def test_admin_endpoint_controls_clock_faults_and_permissions(venue):
    ex = venue()
    state = requests.post(ex.url + "/__admin/advance", json={"seconds": 30}, timeout=5).json()
    assert state["market_ms"] == START_MS + 30_000
    state = requests.post(ex.url + "/__admin/advance", json={"until_ms": START_MS + 45_000}, timeout=5).json()
    assert state["market_ms"] == START_MS + 45_000, "until_ms holds with no client listening too"
    for bad, field in (({"seconds": "soon"}, "seconds"), ({"seconds": -1}, "seconds"), ({"seconds": "inf"}, "seconds"),
                       ({"until_ms": "noon"}, "until_ms"), ({"until_ms": 1.5e12}, "until_ms"),
                       ({"until_ms": "--5"}, "until_ms")):
        resp = requests.post(ex.url + "/__admin/advance", json=bad, timeout=5)
        assert resp.status_code == 400 and field in resp.json()["error"], (bad, resp.status_code, resp.text)
    assert requests.post(ex.url + "/__admin/state", timeout=5).json()["market_ms"] == START_MS + 45_000
    requests.post(ex.url + "/__admin/fault", json={"http_5xx": 1, "http_status": 503}, timeout=5)
    assert requests.get(ex.url + "/v5/market/time", timeout=5).status_code == 503
    assert requests.get(ex.url + "/v5/market/time", timeout=5).status_code == 200
    requests.post(ex.url + "/__admin/permissions", json={"Wallet": ["Withdraw"]}, timeout=5)
    perms = client(ex).get_api_key_information()["result"]["permissions"]
    assert perms["Wallet"] == ["Withdraw"] and perms["ContractTrade"] == ["Order", "Position"]
    assert requests.post(ex.url + "/__admin/fault", json={"nonsense": 1}, timeout=5).status_code == 400
    assert requests.post(ex.url + "/__admin/speed", json={"speed": -1}, timeout=5).status_code == 400
    for bad in ("fast", "nan", None, [1]):
        resp = requests.post(ex.url + "/__admin/speed", json={"speed": bad}, timeout=5)
        assert resp.status_code == 400 and "speed" in resp.json()["error"], (bad, resp.status_code, resp.text)
    assert requests.post(ex.url + "/__admin/speed", json={"speed": 600}, timeout=5).status_code == 200
    wait_until = time.monotonic() + 30
    while requests.post(ex.url + "/__admin/state", timeout=5).json()["market_ms"] < START_MS + 60_000:
        assert time.monotonic() < wait_until, "a clock started at 600x moves market time on its own"
        time.sleep(0.05)


# ------------------------------------------------------------------ WebSocket
class Collector:
    """A raw-mode pybit callback that keeps every frame, thread-safely."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, msg: dict) -> None:
        with self.lock:
            self.frames.append(msg)

    def topic(self, topic: str) -> list[dict]:
        with self.lock:
            return [f for f in self.frames if f.get("topic") == topic]

    def wait(self, pred, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(list(self.frames)):
                    return
            time.sleep(0.02)
        raise AssertionError(f"condition not met; frames: {self.frames[-5:]}")


def private_ws() -> tuple[Collector, ut.WebSocket]:
    """An authenticated private pybit socket (paper keys) whose raw frames land in a Collector."""
    got = Collector()
    return got, ut.WebSocket(channel_type="private", testnet=False, api_key="paper", api_secret="paper",
                             callback_function=got)


@pytest.fixture
def ws_urls(monkeypatch):
    def point(ex: ExchangeThread) -> None:
        monkeypatch.setattr(ut, "PUBLIC_WSS", ex.ws_public)
        monkeypatch.setattr(ut, "PRIVATE_WSS", ex.ws_private)
    return point


def test_public_streams_snapshot_then_consecutive_deltas_and_faults(venue, ws_urls):
    ex = venue([100.0 + 0.01 * i for i in range(100)])
    ws_urls(ex)
    got = Collector()
    ws = ut.WebSocket(channel_type="linear", testnet=False, callback_function=got)
    try:
        ws.orderbook_stream(50, SYMBOL, lambda m: None)
        ws.trade_stream(SYMBOL, lambda m: None)
        book_topic = f"orderbook.50.{SYMBOL}"
        got.wait(lambda fs: any(f.get("topic") == book_topic for f in fs))
        acks = [f for f in got.frames if f.get("op") == "subscribe"]
        assert all(a["success"] for a in acks) and len(acks) == 2
        first = got.topic(book_topic)[0]
        assert first["type"] == "snapshot" and len(first["data"]["b"]) == 10
        ex.advance(3)
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == book_topic]) >= 4)
        books = got.topic(book_topic)
        assert [b["type"] for b in books[:4]] == ["snapshot", "delta", "delta", "delta"]
        us = [b["data"]["u"] for b in books[:4]]
        assert us == list(range(us[0], us[0] + 4))
        # mid +1 tick: best bid 100.00 appears at size 1, the old best (99.99) grows to size 2
        assert ["100.00", "1.000"] in books[1]["data"]["b"] and ["99.99", "2.000"] in books[1]["data"]["b"]
        trades = got.topic(f"publicTrade.{SYMBOL}")
        assert [t["data"][0]["p"] for t in trades[:3]] == ["100.01", "100.02", "100.03"]
        ex.exchange.faults.book_reset = True
        ex.advance(1)
        got.wait(lambda fs: [f for f in fs if f.get("topic") == book_topic][-1]["data"]["u"] == 1)
        assert got.topic(book_topic)[-1]["type"] == "snapshot"
        ex.exchange.faults.push_topic = book_topic
        ex.exchange.faults.duplicate_pushes = 1
        n = len(got.topic(book_topic))
        ex.advance(1)
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == book_topic]) >= n + 2)
        dup = got.topic(book_topic)[n:n + 2]
        assert dup[0] == dup[1] and dup[0]["data"]["u"] == 2
        ex.exchange.faults.reorder_pushes = 1
        ex.advance(1)
        ex.advance(1)
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == book_topic]) >= n + 4)
        assert [b["data"]["u"] for b in got.topic(book_topic)[n + 2:n + 4]] == [4, 3]
        ex.exchange.faults.mute_pushes = True
        before = len(got.frames)
        ex.advance(3)
        time.sleep(0.3)
        assert len(got.frames) == before and ws.is_connected()  # silent but connected
        ex.exchange.faults.mute_pushes = False
        ex.advance(1)
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == book_topic]) > n + 4)
        assert got.topic(book_topic)[-1]["data"]["u"] == 5  # the muted changes arrive as one delta
    finally:
        ws.exit()


def test_subscribe_acks_echo_req_id_and_reject_unknown_topics(venue, ws_urls):
    ex = venue()
    ws_urls(ex)
    got = Collector()
    ws = ut.WebSocket(channel_type="linear", testnet=False, callback_function=got)
    try:
        ws.orderbook_stream(1, "BTCUSDT", lambda m: None)
        got.wait(lambda fs: any(f.get("op") == "subscribe" for f in fs))
        ack = next(f for f in got.frames if f.get("op") == "subscribe")
        assert ack["success"] is False and "BTCUSDT" in ack["ret_msg"]
        req_id = next(iter(ws.subscriptions))
        assert ack["req_id"] == req_id
    finally:
        ws.exit()


def test_private_streams_follow_the_order_lifecycle_and_survive_drops(venue, ws_urls):
    ex = venue()
    ws_urls(ex)
    got, ws = private_ws()
    pub = ut.WebSocket(channel_type="linear", testnet=False)
    books: list[dict] = []
    try:
        for stream in (ws.order_stream, ws.execution_stream, ws.position_stream, ws.wallet_stream):
            stream(lambda m: None)
        pub.orderbook_stream(1, SYMBOL, books.append)  # pybit's default dispatcher with its req_id lookup
        got.wait(lambda fs: sum(f.get("op") == "subscribe" for f in fs) == 4)
        assert any(f.get("op") == "auth" and f["success"] for f in got.frames)
        s = client(ex)
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1", price="100.01",
                      orderLinkId="ws1")
        got.wait(lambda fs: any(f.get("topic") == "wallet" for f in fs))
        topics = [f["topic"] for f in got.frames if "topic" in f]
        assert topics[:4] == ["execution", "order", "position", "wallet"]
        fill = got.topic("execution")[0]["data"][0]
        assert (fill["execPrice"], fill["execQty"], fill["orderLinkId"]) == ("100.01", "1.000", "ws1")
        assert got.topic("order")[0]["data"][0]["orderStatus"] == "Filled"
        assert got.topic("position")[0]["data"][0]["entryPrice"] == "100.01"
        for how in ("abort", "close"):
            before = len(books)
            dropped = ex.call(ex.exchange.drop_ws, "all", how)
            assert dropped == 2
            got.wait(lambda fs: sum(f.get("op") == "auth" for f in fs) >= (2 if how == "abort" else 3))
            ex.advance(2)
            deadline = time.monotonic() + 5
            while len(books) <= before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(books) > before and pub.is_connected()
        s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="1",
                      reduceOnly=True, orderLinkId="ws2")
        got.wait(lambda fs: any(f.get("topic") == "order" and f["data"][0]["orderLinkId"] == "ws2" for f in fs))
    finally:
        ws.exit()
        pub.exit()


def test_a_lockstep_advance_stops_at_the_message_that_made_a_private_event(venue, ws_urls):
    """POST /__admin/advance {until_ms, stop_at_private}: market time stops at the recorded trade that filled a
    resting bid (so a lockstep client reacts to the fill at that market time, as in real time), and the next
    advance goes on to until_ms."""
    trades = [(1, "Sell", 0.4, 99.95), (3, "Sell", 1.0, 99.80), (5, "Sell", 0.4, 99.95)]
    ex = venue(trades=trades, per_message=True)
    ws_urls(ex)
    got, ws = private_ws()
    try:
        ws.execution_stream(lambda m: None)
        got.wait(lambda fs: any(f.get("op") == "subscribe" for f in fs))
        client(ex).place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="0.5",
                               price="99.90", orderLinkId="bid")
        body = {"until_ms": START_MS + 8_000, "stop_at_private": True}
        first = requests.post(ex.url + "/__admin/advance", json=body, timeout=5).json()
        assert first["market_ms"] == START_MS + 3_500 and first["next_ms"] <= START_MS + 8_000   # the 99.80 print
        got.wait(lambda fs: any(f.get("topic") == "execution" for f in fs))
        rest = requests.post(ex.url + "/__admin/advance", json=body, timeout=5).json()
        assert rest["market_ms"] == START_MS + 8_000
    finally:
        ws.exit()


def test_rest_waits_for_the_end_of_a_streaming_advance(venue):
    """POST /__admin/advance lets each push leave while it applies the next message (a lockstep client handles
    them meanwhile), but a REST request arriving then is served after the step: market state changes only in
    recorded order, so what a client is told does not depend on when its request landed."""
    import aiohttp
    ex = venue(per_message=True)

    async def race() -> tuple[list[bool], dict, int]:
        async with aiohttp.ClientSession() as http, http.ws_connect(ex.ws_public.format(CHANNEL_TYPE="linear")) as ws:
            await ws.send_json({"op": "subscribe", "args": [f"publicTrade.{SYMBOL}"], "req_id": "t"})
            assert (await ws.receive_json())["success"]
            step = asyncio.ensure_future(ex.exchange.advance_streaming(60.0))
            first = await ws.receive_json(timeout=5)           # a push of the advance, before its end
            busy = [ex.exchange._market_lock.locked(), step.done()]
            async with http.get(ex.url + "/v5/market/recent-trade",
                                params={"category": "linear", "symbol": SYMBOL, "limit": "1"}) as resp:
                answer = await resp.json()
            busy.append(step.done())
            return busy, answer, first["ts"]

    busy, answer, first_ts = ex.call(race)
    assert busy == [True, False, True]   # mid-advance when asked; answered only once it was over
    newest = int(answer["result"]["list"][0]["time"])
    assert first_ts < newest == ex.exchange.replay.recent[-1].ts_ms and newest > START_MS + 55_000


def test_a_replay_from_start_reads_the_book_from_that_days_snapshot_and_equals_a_full_replay(tmp_path):
    """--start builds the book from the opening snapshot of start's day file (every day file opens with one),
    not by replaying every earlier day: the book, the candles and the recent trades at start are those of a
    replay from the first file advanced to the same moment."""
    import market_sim
    folder = market_sim.simulate_run(symbol="SIMUSDT", days=2, seed=3, out=tmp_path, book_interval="30s",
                                     levels=20, progress=False).folder
    start = parse_start("2026-01-02T00:10")
    late = build_exchange(folder, start="2026-01-02T00:10").replay
    full = build_exchange(folder).replay
    full._apply_until(start - 1)
    full.now_ms = start
    assert late.now_ms == full.now_ms == start and late.book_updates < full.book_updates
    for a, b in zip(late.book.top(20), full.book.top(20)):
        np.testing.assert_array_equal(a, b)
    assert late.candles(60, limit=3000) == full.candles(60, limit=3000)
    assert list(late.recent) == list(full.recent) and late.next_ms() == full.next_ms()
    assert late.engine.last_price == full.engine.last_price and late.stats_24h() == full.stats_24h()


def test_a_start_outside_the_data_is_refused_naming_the_days_it_covers(tmp_path):
    """--start before the first file would replay from the data's beginning as if nothing were wrong."""
    folder = write_market(tmp_path, [100.0] * 10)
    with pytest.raises(ValueError, match=r"--start 2025-12-01: the data in .* covers 2026-01-01 to 2026-01-01"):
        build_exchange(folder, start="2025-12-01")
    assert build_exchange(folder, start="2026-01-01T00:00").replay.now_ms == parse_start("2026-01-01T00:00")
    with pytest.raises(ValueError, match=f"--symbol BTCUSDT: the data in .* is {SYMBOL}"):
        build_exchange(folder, symbol="BTCUSDT")


def test_a_taken_port_is_refused_in_one_line(tmp_path):
    """paper_exchange.py on a port another server holds: a one-line error (exit 2), not a traceback."""
    import socket
    import subprocess
    import sys
    folder = write_market(tmp_path, [100.0] * 10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "paper_exchange.py"), "--data-dir", str(folder), "--port",
                               str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_trade_stamps_are_truncated_to_the_millisecond_like_bybits_T():
    """The files keep 0.1 ms; a trade at 59.9996 s belongs to the minute data_loader puts it in."""
    chunk = pd.DataFrame({"timestamp": [1767398459.9996, 1767398400.645, 1767398400.0], "side": ["Buy"] * 3,
                          "size": [1.0] * 3, "price": [100.0] * 3, "trdMatchID": ["a", "b", "c"]})
    assert [t.ts_ms for t in trade_prints([chunk])] == [1767398459999, 1767398400645, 1767398400000]


def test_lockstep_has_no_wall_clock_rate_limit_but_injected_bursts_still_answer(venue):
    """Minutes of market time pass in milliseconds of wall time under lockstep: the per-second order limit
    (answered after 10 orders in test_rate_limit_answers_10006...) would only make the client sleep. An injected
    10006 burst still answers."""
    ex = venue()
    ex.exchange.rate_window_s, ex.exchange.rate_limits = 60.0, False
    s = client(ex, retry_codes={-1})
    for n in range(15):
        assert s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="0.1",
                             price="90.00", orderLinkId=f"o{n}")["retCode"] == 0
    ex.exchange.faults.rate_limit_burst = 1
    assert code_of(lambda: s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit",
                                         qty="0.1", price="90.00", orderLinkId="o-burst")) == 10006


def test_private_categorised_topics_are_echoed_exactly(venue, ws_urls):
    ex = venue()
    ws_urls(ex)
    got, ws = private_ws()
    try:
        ws.subscribe("order.linear", lambda m: None, symbol="")
        got.wait(lambda fs: any(f.get("op") == "subscribe" for f in fs))
        client(ex).place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="1",
                               price="99.00", orderLinkId="cat")
        got.wait(lambda fs: any("topic" in f for f in fs))
        assert {f["topic"] for f in got.frames if "topic" in f} == {"order.linear"}
    finally:
        ws.exit()


def test_private_push_faults_duplicate_and_reorder_executions(venue, ws_urls):
    ex = venue()
    ws_urls(ex)
    got, ws = private_ws()
    try:
        ws.execution_stream(lambda m: None)
        got.wait(lambda fs: any(f.get("op") == "subscribe" for f in fs))
        ex.exchange.faults.push_topic = "execution"
        ex.exchange.faults.duplicate_pushes = 1
        s = client(ex)
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1", orderLinkId="d")
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == "execution"]) == 2)
        first, second = got.topic("execution")
        assert first["data"] == second["data"]  # same execId twice: a client must de-duplicate
        ex.exchange.faults.reorder_pushes = 1
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="3", orderLinkId="r")
        got.wait(lambda fs: len([f for f in fs if f.get("topic") == "execution"]) == 4)
        prices = [f["data"][0]["execPrice"] for f in got.topic("execution")[2:]]
        assert prices == ["100.02", "100.01"]  # the book walk filled 100.01 first; it arrives second
    finally:
        ws.exit()


def test_ws_auth_rejects_a_wrong_secret_and_answers_json_pings(venue):
    import websocket
    ex = venue()
    conn = websocket.create_connection(ex.ws_private, timeout=5)
    try:
        conn.send(json.dumps({"op": "ping", "req_id": "p1"}))
        pong = json.loads(conn.recv())
        assert pong["op"] == "pong" and pong["req_id"] == "p1"
        conn.send(json.dumps({"op": "auth", "args": ["paper", int(time.time() * 1000) + 1000, "00" * 32]}))
        assert json.loads(conn.recv())["success"] is False
        conn.send(json.dumps({"op": "subscribe", "req_id": "s", "args": ["order"]}))
        ack = json.loads(conn.recv())
        assert ack["success"] is False and ack["ret_msg"] == "Request not authorized"
    finally:
        conn.close()


# ------------------------------------------------------------------ clock and CLI
def test_replay_clock_runs_at_speed_and_as_fast_as_possible(tmp_path):
    folder = write_market(tmp_path, [100.0 + 0.01 * (i % 7) for i in range(3600)])
    ex = build_exchange(folder, speed=float("inf"))
    with ExchangeThread(ex) as thread:
        deadline = time.monotonic() + 20
        while not thread.call(lambda: ex.replay.exhausted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread.call(lambda: ex.replay.book_u) == 3600
    slow = build_exchange(folder, speed=60.0)
    started = time.monotonic()
    with ExchangeThread(slow) as thread:
        time.sleep(0.5)
        elapsed_market = thread.call(lambda: slow.replay.now_ms) - START_MS
        wall = time.monotonic() - started
    assert 15_000 <= elapsed_market <= 60_000 * wall  # 60 market seconds per wall second, never ahead of it


def test_engine_replays_hours_of_market_without_a_server(tmp_path):
    mids = [100.0 + (0.5 if (i // 600) % 2 else 0.0) for i in range(4 * 3600)]
    folder = write_market(tmp_path, mids)
    import data_loader
    engine = MatchingEngine(load_instrument(folder, SYMBOL))
    replay = MarketReplay(engine, data_loader.iter_book_messages(folder), data_loader.iter_trades(folder))
    engine.place_order({"category": "linear", "symbol": SYMBOL, "side": "Sell", "orderType": "Limit",
                        "qty": "1", "price": "100.40"})
    replay.advance(4 * 3600)
    assert replay.book_u == 4 * 3600
    assert engine.positions[0].size == -1000  # filled when the mid jumped to 100.50 at 10 minutes
    assert engine.positions[0].entry == pytest.approx(100.40)


def test_cli_prints_its_url_and_serves(tmp_path):
    folder = write_market(tmp_path, FLAT)
    proc = subprocess.Popen([sys.executable, str(ROOT / "paper_exchange.py"), "--data-dir", str(folder),
                             "--port", "0", "--speed", "60", "--balance", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line
        url = line.split()[4]
        s = HTTP(api_key="paper", api_secret="paper")
        s.endpoint = url
        assert wallet(s)["totalWalletBalance"] == "500"
    finally:
        proc.terminate()
        proc.wait(10)


def test_serves_a_market_sim_folder(tmp_path, venue):
    import market_sim
    folder = market_sim.simulate(days=1, out=tmp_path / "sim", levels=50, book_interval="1s")
    with ExchangeThread(build_exchange(folder)) as ex:
        ex.advance(600)
        s = client(ex)
        book = s.get_orderbook(category="linear", symbol="DEMOUSDT", limit=50)["result"]
        depth = ex.call(lambda: tuple(len(x) for x in ex.exchange.replay.book.top(50)[::2]))
        assert (len(book["b"]), len(book["a"])) == depth and min(depth) >= 10
        assert float(book["b"][0][0]) < float(book["a"][0][0])
        assert book["ts"] <= START_MS + 600_000 and book["u"] >= 500
        s.place_order(category="linear", symbol="DEMOUSDT", side="Buy", orderType="Market", qty="0.5",
                      orderLinkId="sim")
        fills = s.get_executions(category="linear", symbol="DEMOUSDT", orderLinkId="sim")["result"]["list"]
        asks = {p: float(q) for p, q in book["a"]}
        assert sum(float(f["execQty"]) for f in fills) == pytest.approx(0.5)
        for f in fills:  # every fill took a level of the book we just read, never more than it showed
            assert f["execPrice"] in asks and float(f["execQty"]) <= asks[f["execPrice"]] + 1e-9


def test_rebase_time_shifts_all_market_times_to_now_by_whole_minutes(tmp_path):
    folder = write_market(tmp_path, FLAT)
    before = int(time.time() * 1000)
    with ExchangeThread(build_exchange(folder, rebase_time=True)) as ex:
        s = client(ex)
        book = s.get_orderbook(category="linear", symbol=SYMBOL, limit=1)["result"]
        shift = book["ts"] - START_MS
        assert shift % 60_000 == 0 and before - 60_000 < book["ts"] <= int(time.time() * 1000)
        assert book["cts"] == START_MS - 1 + shift
        ex.advance(10)
        s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="1", orderLinkId="rb")
        assert int(order(s, "rb")["createdTime"]) == START_MS + 10_000 + shift
        trade = s.get_public_trade_history(category="linear", symbol=SYMBOL, limit=1)["result"]["list"][0]
        assert int(trade["time"]) == START_MS + 9_500 + shift
        candle = s.get_kline(category="linear", symbol=SYMBOL, interval="1", limit=1)["result"]["list"][0]
        assert int(candle[0]) == START_MS + shift


def apply_levels(side: dict[str, str], levels: list[list[str]]) -> None:
    """Bybit level semantics: absolute size, zero deletes."""
    for px, qty in levels:
        if float(qty) == 0:
            side.pop(px, None)
        else:
            side[px] = qty


def test_real_bybit_archive_book_is_served_and_streamed_consistently(tmp_path, realdata, ws_urls):
    """The real XRPUSDT ob500 archive (1 snapshot + 49 deltas): REST equals an independent rebuild of the file,
    and a client applying our orderbook.50 snapshot + deltas ends with exactly the REST top 50."""
    src = realdata / "bybit" / "2024-12-01_XRPUSDT_ob500.data"
    folder = tmp_path / "XRPUSDT_Real"
    (folder / "Orderbook").mkdir(parents=True)
    (folder / "Orderbook" / src.name).write_bytes(src.read_bytes())
    (folder / "instrument.json").write_text(json.dumps({"symbol": "XRPUSDT", "tickSize": "0.0001", "qtyStep": "1",
                                                        "minOrderQty": "1", "minNotionalValue": "5"}))
    bids: dict[str, str] = {}
    asks: dict[str, str] = {}
    for line in src.read_text().splitlines():
        msg = json.loads(line)
        if msg["type"] == "snapshot":
            bids.clear()
            asks.clear()
        for side, levels in ((bids, msg["data"]["b"]), (asks, msg["data"]["a"])):
            apply_levels(side, levels)
    want_b = sorted(bids.items(), key=lambda kv: -float(kv[0]))[:50]
    want_a = sorted(asks.items(), key=lambda kv: float(kv[0]))[:50]
    with ExchangeThread(build_exchange(folder)) as ex:
        ws_urls(ex)
        got = Collector()
        ws = ut.WebSocket(channel_type="linear", testnet=False, callback_function=got)
        try:
            ws.orderbook_stream(50, "XRPUSDT", lambda m: None)
            got.wait(lambda fs: any(f.get("topic") == "orderbook.50.XRPUSDT" for f in fs))
            for _ in range(6):
                ex.advance(1)
            s = client(ex)
            rest = s.get_orderbook(category="linear", symbol="XRPUSDT", limit=50)["result"]
            got.wait(lambda fs: [f for f in fs if f.get("topic") == "orderbook.50.XRPUSDT"][-1]["data"]["u"] >= 6)
        finally:
            ws.exit()
        assert [(p, str(int(float(q)))) for p, q in rest["b"]] == want_b
        assert [(p, str(int(float(q)))) for p, q in rest["a"]] == want_a
        frames = got.topic("orderbook.50.XRPUSDT")
        assert frames[0]["type"] == "snapshot"
        assert [f["data"]["u"] for f in frames] == list(range(frames[0]["data"]["u"],
                                                              frames[0]["data"]["u"] + len(frames)))
        mirror_b: dict[str, str] = {}
        mirror_a: dict[str, str] = {}
        for f in frames:
            for side, levels in ((mirror_b, f["data"]["b"]), (mirror_a, f["data"]["a"])):
                apply_levels(side, levels)
        assert sorted(mirror_b.items(), key=lambda kv: -float(kv[0])) == [tuple(x) for x in rest["b"]]
        assert sorted(mirror_a.items(), key=lambda kv: float(kv[0])) == [tuple(x) for x in rest["a"]]
        s.place_order(category="linear", symbol="XRPUSDT", side="Sell", orderType="Market", qty="10000",
                      orderLinkId="real")
        fills = s.get_executions(category="linear", symbol="XRPUSDT", orderLinkId="real")["result"]["list"]
        expected, left = [], 10000
        for px, qty in rest["b"]:
            take = min(left, int(qty))
            expected.append((px, str(take)))
            left -= take
            if not left:
                break
        assert sorted((f["execPrice"], f["execQty"]) for f in fills) == sorted(expected)


def test_liquidation_closes_everything_when_equity_reaches_maintenance_margin(venue):
    mids = [100.0] * 5 + [100.0 - 0.5 * i for i in range(1, 40)]
    ex = venue(mids, balance=100.0)
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="9")  # IM 90 at 10x
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Limit", qty="0.5", price="50.00",
                  orderLinkId="far")
    fills = s.get_executions(category="linear", symbol=SYMBOL)["result"]["list"]
    entry = sum(float(f["execValue"]) for f in fills) / 9
    fees = sum(float(f["execFee"]) for f in fills)
    # the first one-second book whose mid brings equity to the 0.5% maintenance margin
    second = next(i for i, mid in enumerate(mids) if 100 - fees + (mid - entry) * 9 <= 9 * mid * 0.005)
    ex.advance(second - 0.1)
    assert position(s)["size"] == "9.000"
    ex.advance(0.2)
    assert position(s)["size"] == "0"
    assert order(s, "far")["cancelType"] == "CancelAllBeforeLiq"
    liq = [f for f in s.get_executions(category="linear", symbol=SYMBOL)["result"]["list"]
           if f["createType"] == "CreateByLiq"]
    bids = [round(mids[second] - 0.01 * (k + 1), 2) for k in range(4)]
    assert sorted((float(f["execPrice"]), f["execQty"]) for f in liq) == sorted(
        zip(bids, ["1.000", "2.000", "3.000", "3.000"]))
    assert float(wallet(s)["totalWalletBalance"]) >= 0.0


def test_funding_is_settled_every_eight_hours_on_position_value(venue):
    ex = venue([100.0] * 6 * 10 + [102.0] * 60, step_s=600, venue=VenueConfig(funding_rate_8h=0.0001))
    s = client(ex)
    s.place_order(category="linear", symbol=SYMBOL, side="Buy", orderType="Market", qty="2")
    after_fee = float(wallet(s)["totalWalletBalance"])
    ex.advance(8 * 3600 - 1)
    assert not [f for f in s.get_executions(category="linear", symbol=SYMBOL)["result"]["list"]
                if f["execType"] == "Funding"]
    ex.advance(2)  # 08:00 UTC, mid 100 (the book of 07:50 is the latest)
    funding = [f for f in s.get_executions(category="linear", symbol=SYMBOL)["result"]["list"]
               if f["execType"] == "Funding"]
    assert len(funding) == 1 and funding[0]["execTime"] == str(START_MS + 8 * 3600 * 1000)
    assert float(funding[0]["execFee"]) == pytest.approx(2 * 100.0 * 0.0001)
    assert float(wallet(s)["totalWalletBalance"]) == pytest.approx(after_fee - 0.02)
    s.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="4")  # now short 2
    ex.advance(8 * 3600)  # 16:00 UTC at mid 102: the short receives
    funding = s.get_executions(category="linear", symbol=SYMBOL, execType="Funding")["result"]["list"]
    assert len(funding) == 2 and float(funding[0]["execFee"]) == pytest.approx(-2 * 102.0 * 0.0001)


def test_pybit_default_dispatcher_merges_our_deltas_into_the_rest_book(venue, ws_urls):
    ex = venue([100.0 + 0.03 * ((i * 7) % 11) for i in range(60)])
    ws_urls(ex)
    latest: list[dict] = []
    ws = ut.WebSocket(channel_type="linear", testnet=False)
    try:
        ws.orderbook_stream(50, SYMBOL, latest.append)
        deadline = time.monotonic() + 5
        while not latest and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(20):
            ex.advance(1)
        rest = client(ex).get_orderbook(category="linear", symbol=SYMBOL, limit=50)["result"]
        want = (sorted(map(tuple, rest["b"])), sorted(map(tuple, rest["a"])))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # pushes arrive on pybit's thread
            merged = latest[-1]["data"]
            if (sorted(map(tuple, merged["b"])), sorted(map(tuple, merged["a"]))) == want:
                break
            time.sleep(0.02)
        assert ws.is_connected() and latest[-1]["data"]["u"] >= 20
        assert (sorted(map(tuple, merged["b"])), sorted(map(tuple, merged["a"]))) == want
    finally:
        ws.exit()


def test_engine_caps_active_orders_at_500(tmp_path):
    import data_loader
    folder = write_market(tmp_path, FLAT)
    engine = MatchingEngine(load_instrument(folder, SYMBOL))
    MarketReplay(engine, data_loader.iter_book_messages(folder), data_loader.iter_trades(folder))
    params = {"category": "linear", "symbol": SYMBOL, "side": "Buy", "orderType": "Limit", "qty": "0.1"}
    for i in range(500):
        engine.place_order({**params, "price": f"{95 - 0.01 * (i % 100):.2f}"})
    with pytest.raises(ExchangeError) as info:
        engine.place_order({**params, "price": "95.00"})
    assert info.value.code == 110020
    engine.cancel_order({"category": "linear", "symbol": SYMBOL, "orderId": next(iter(engine.active))})
    assert engine.place_order({**params, "price": "95.00"})["orderId"]


def test_orderbook_deltas_carry_exactly_the_changed_new_and_gone_levels_of_the_dict_rule():
    """The compiled level kernels against the plain rule they replace: levels keyed by tick in book order (a tick
    met twice keeps its first place and last size), a delta sends every new level whose size differs from the
    last sent or that was not sent (new order), then every sent tick now missing (old order)."""
    from matching import Instrument
    from paper_exchange import level_changes, unique_levels
    rng = np.random.default_rng(3)
    tick, step = 0.5, 0.001
    inst = Instrument("X", tick_size=Decimal("0.5"), qty_step=Decimal("0.001"), min_qty=Decimal("0.001"),
                      min_notional=Decimal(5))
    for _ in range(3000):
        bids = bool(rng.integers(2))

        def side() -> tuple[np.ndarray, np.ndarray]:
            prices = np.sort(rng.integers(200, 215, rng.integers(0, 12)) * tick + rng.uniform(-0.2, 0.2))
            sizes = rng.integers(0, 4, len(prices)) * step + 1e-13
            return (prices[::-1] if bids else prices), sizes

        (old_p, old_q), (new_p, new_q) = side(), side()
        old_d = {int(grid.grid_index(p, tick, grid.NEAREST)): int(grid.grid_index(q + 1e-12, step, grid.DOWN))
                 for p, q in zip(old_p, old_q)}
        new_d = {int(grid.grid_index(p, tick, grid.NEAREST)): int(grid.grid_index(q + 1e-12, step, grid.DOWN))
                 for p, q in zip(new_p, new_q)}
        old, new = unique_levels(*inst.level_arrays(old_p, old_q)), unique_levels(*inst.level_arrays(new_p, new_q))
        assert list(zip(*(a.tolist() for a in new))) == list(new_d.items())
        changed, gone = level_changes(*old, *new, -1 if bids else 1)
        assert list(zip(new[0][changed].tolist(), new[1][changed].tolist())) == \
            [(t, q) for t, q in new_d.items() if old_d.get(t) != q]
        assert old[0][gone].tolist() == [t for t in old_d if t not in new_d]


def test_reading_ahead_between_advances_changes_no_push(tmp_path):
    """Between lockstep advances the exchange reads recorded messages before their turn (parsing, a second book,
    its top levels; the second book starts as a copy of the replay's at the first read ahead). An advance then
    pushes exactly the book deltas it pushes without reading ahead, where each top is taken from the replay's own
    book at its turn, and the top levels read ahead are that book's once it has applied each message."""
    rng = np.random.default_rng(11)
    mids = list(100.0 + np.cumsum(rng.integers(-2, 3, 900)) * 0.1)
    folder = write_market(tmp_path, mids)

    def pushes(ahead: bool) -> tuple[list, int]:
        exchange = build_exchange(folder, per_message=True)
        exchange._book_topic(50)   # what a subscription to orderbook.50 sets up
        frames, read_before = [], 0
        while (nxt := exchange.replay.next_ms()) is not None:
            if ahead and rng.random() < 0.3:
                exchange.replay.read_ahead(nxt + int(rng.integers(0, 20_000)), int(rng.integers(1, 40)))
            exchange.replay.apply_next()
            top = exchange.replay.book_top.get(50)
            if top is not None:
                read_before += 1
                assert all(np.array_equal(a, b) for a, b in zip(top, exchange.replay.book.top(50)))
            frames += exchange._market_frames([])
        return frames, read_before

    (plain, none_read), (ahead, read) = pushes(False), pushes(True)
    assert none_read == 0 and read > 300
    assert len(plain) > 800 and ahead == plain


def test_a_read_error_met_reading_ahead_fails_the_apply_that_reaches_it_not_earlier(tmp_path):
    """A data file that breaks while the exchange reads ahead (a corrupt gzip block, say) is not taken for the
    end of the data: the error comes out of the apply that reaches it, where a replay that never read ahead
    meets it, with the same messages applied before; the replay then holds no next message (none is applied
    twice) and says it is exhausted."""
    import zlib
    import data_loader
    folder = write_market(tmp_path, FLAT)

    def broken():
        for i, msg in enumerate(data_loader.iter_book_messages(folder, levels=True)):
            if i == 50:
                raise zlib.error("invalid stored block lengths")
            yield msg

    outcomes = []
    for ahead in (False, True):
        replay = MarketReplay(MatchingEngine(load_instrument(folder, SYMBOL)), broken(),
                              data_loader.iter_trades(folder))
        applied = 0
        with pytest.raises(zlib.error):
            while True:
                if ahead:
                    replay.read_ahead(replay.next_ms() + 100_000, 500)
                replay.apply_next()
                applied += 1
        assert replay.next_ms() is None and replay.exhausted and replay.apply_next() == 0
        outcomes.append((applied, replay.book_u, len(replay.recent)))
    assert outcomes[0] == outcomes[1] and outcomes[0][1] == 50
