"""The engine's exit codes (DESIGN §3 watchdog contract) in their situations: 2 before any network, 3 for
refused startup checks, 4 for a reconciliation that cannot complete, 0 for SIGTERM (state saved, resting
entries cancelled). The refusals run in process (no network is reached); the rest as real child processes
against the paper exchange on 127.0.0.1."""
from __future__ import annotations

import json
import signal
import sys
import time

import pytest

import live_trading_v2 as live
from live_support import SYMBOL, engine_cmd, exchange, journal, make_market, output, run, spawn, stop, wait_for, \
    write_model_dir, write_probabilities


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return make_market(tmp_path_factory.mktemp("market"))


def refused(tmp_path, monkeypatch, *argv: str) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(live.Refusal) as info:
        live.prepare(live.parse_args(["--symbol", SYMBOL, *argv]), env={})
    assert info.value.code == live.EXIT_CONFIG
    return str(info.value)


def test_bad_arguments_keys_model_and_state_exit_2_before_any_network(tmp_path, monkeypatch):
    model = write_model_dir(tmp_path, edge=False)
    m = ["--model-dir", str(model)]
    assert "pick one mode" in refused(tmp_path, monkeypatch, *m, "--paper", "http://127.0.0.1:1", "--live")
    assert "keys" in refused(tmp_path, monkeypatch, *m, "--live", "--keys-file", str(tmp_path / "none.json"))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"profiles": {"default": {"api_key": "k", "api_secret": "SECRETVALUE"}}}))
    text = refused(tmp_path, monkeypatch, *m, "--testnet", "--keys-file", str(keys))
    assert "no EDGE verdict" in text and "--allow-no-edge" in text
    keys.write_text("{not json")
    text = refused(tmp_path, monkeypatch, *m, "--demo", "--allow-no-edge", "--keys-file", str(keys))
    assert "invalid JSON" in text and "SECRETVALUE" not in text
    assert "no model" in refused(tmp_path, monkeypatch, "--model-dir", str(tmp_path / "nowhere"))
    assert "--data-dir" in refused(tmp_path, monkeypatch, *m, "--data-dir", str(tmp_path / "nowhere"))
    assert "live.mode" in refused(tmp_path, monkeypatch, *m, "--set", "live.mode=live")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / f"bot_state_{SYMBOL}_dry-run.json").write_text(json.dumps({"version": 99}))
    assert "newer than this engine" in refused(tmp_path, monkeypatch, *m)
    assert live.main(["--symbol", SYMBOL, *m], env={}) == live.EXIT_CONFIG


def test_a_corrupt_model_file_is_a_refusal_naming_it_not_a_crash_to_restart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path)
    (model / "features.json").write_text('{"features": [')   # a copy cut short
    assert live.main(["--symbol", SYMBOL, "--model-dir", str(model)], env={}) == live.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "features.json: not a readable model bundle" in err and "Traceback" not in err


def test_lockstep_runs_the_periodic_jobs_on_market_time_and_the_other_modes_on_the_monotonic_clock():
    """Reconciliation, the stop guard and the equity record come due by market time in lockstep, however long
    the machine took for a step (a wall-clock schedule reconciled at load-dependent market moments); a paced
    replay and live by the monotonic clock. The two-day parity test counts the lockstep reconciliations."""
    lockstep, paced, venue = live.Clock(market=True, lockstep=True), live.Clock(market=True), live.Clock()
    for clock in (lockstep, paced, venue):
        clock.saw(1_767_312_000_000)
    assert lockstep.schedule_s() == 1_767_312_000.0
    assert paced.schedule_s() == pytest.approx(time.monotonic(), abs=5.0)
    assert venue.schedule_s() == pytest.approx(time.monotonic(), abs=5.0)


def test_dry_run_is_the_default_and_paper_uses_the_paper_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path, edge=False)
    setup = live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model)]), env={})
    assert setup.mode == "dry-run" and setup.creds is None and setup.cfg.live.position_mode == "hedge"
    setup = live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model), "--paper",
                                          "http://127.0.0.1:9"]), env={})
    assert setup.mode == "paper" and setup.cfg.live.keys_profile == "paper"
    assert setup.cfg.live.rest_url == "http://127.0.0.1:9"


def test_refused_startup_checks_exit_3(market, tmp_path):
    """The paper exchange standing in for Bybit (--rest-url/--ws-url): --live with a key that can move funds,
    --demo on an account that cannot be switched to hedge mode, --testnet on a skewed clock."""
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"profiles": {"default": {"api_key": "paper", "api_secret": "paper"}}}))
    with exchange(market) as ex:
        def venue(mode: str) -> tuple[int, str]:
            return run([sys.executable, str(live.Path(live.__file__)), "--symbol", SYMBOL, "--model-dir", str(model),
                        "--data-dir", str(market), "--probabilities", str(probs), "--keys-file", str(keys),
                        "--rest-url", ex.url, "--ws-url", ex.url.replace("http", "ws"), mode], tmp_path)

        ex.call(lambda: ex.exchange.permissions.update({"Wallet": ["AccountTransfer"]}))
        rc, out = venue("--live")
        assert rc == live.EXIT_STARTUP, out[-2000:]
        assert f"{SYMBOL} live engine starting" in out and "can move funds" in out
        ex.call(lambda: ex.exchange.permissions.update({"Wallet": []}))
        ex.call(lambda: setattr(ex.exchange.faults, "refuse_mode_switch", True))
        rc, out = venue("--demo")
        assert rc == live.EXIT_STARTUP, out[-2000:]
        assert f"{SYMBOL} demo engine starting" in out and "cannot switch to hedge mode" in out
        assert not ex.call(lambda: ex.exchange.engine.hedge)
        ex.call(lambda: setattr(ex.exchange.faults, "refuse_mode_switch", False))
        ex.call(lambda: setattr(ex.exchange.faults, "time_skew_ms", 60_000))
        rc, out = venue("--testnet")
    assert rc == live.EXIT_STARTUP, out[-2000:]
    assert f"{SYMBOL} testnet engine starting" in out and "clock offset" in out


def test_failed_startup_reconciliation_exits_4(market, tmp_path):
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        ex.call(lambda: (setattr(ex.exchange.faults, "http_5xx", 1000),
                         setattr(ex.exchange.faults, "http_path", "/v5/execution/list")))
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs)), tmp_path)
    assert rc == live.EXIT_RECONCILE, out[-2000:]
    assert [e["event"] for e in journal(tmp_path, "events")].count("reconcile_failed") >= 1


def test_an_unreachable_exchange_at_startup_exits_5_naming_it_without_a_traceback(market, tmp_path):
    """Exit 5, which the watchdog restarts with backoff (a network still coming up), not 4 (a failed
    reconciliation, which it does not restart)."""
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        url = ex.url
    rc, out = run(engine_cmd(url, model, market, "--probabilities", str(probs)), tmp_path)
    assert rc == live.EXIT_UNREACHABLE == 5, out[-2000:]
    assert "Traceback" not in out
    failed = [e for e in journal(tmp_path, "events") if e["event"] == "error"]
    assert failed and f"the exchange at {url} could not be reached" in failed[-1]["message"]


def test_a_second_engine_on_the_same_state_is_refused_before_it_writes_anything(tmp_path, monkeypatch):
    """Two engines on one state file would both trade it: the second (another terminal, or one started beside
    the watchdog's) is refused, exit 2, and writes no heartbeat or journal; once the first is gone it starts."""
    from watchdog import acquire_lock
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    monkeypatch.chdir(tmp_path)
    argv = ["--symbol", SYMBOL, "--model-dir", str(model), "--probabilities", str(probs), "--paper",
            "http://127.0.0.1:9"]
    held, _ = acquire_lock(tmp_path / "state" / f"bot_state_{SYMBOL}.lock")
    assert live.main(argv, env={}) == live.EXIT_CONFIG
    assert not (tmp_path / "state" / f"heartbeat_{SYMBOL}.json").exists()
    assert not list((tmp_path / "logs").glob("*.jsonl"))   # no journal record (its refusal is in the log file)
    held.close()
    assert live.main(argv, env={}) == live.EXIT_UNREACHABLE   # free now: it starts (and finds no exchange at :9)
    beat = json.loads((tmp_path / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert beat["exit_code"] == live.EXIT_UNREACHABLE
    assert beat["stop_reason"].startswith("startup: the exchange at http://127.0.0.1:9 could not be reached")


def test_an_exception_escaping_the_engine_is_a_crash_in_its_last_heartbeat(tmp_path, monkeypatch):
    """Whatever step raises, the exception goes on (the interpreter exits 1) and the last heartbeat and the shutdown
    event say so: exit code 1 and what was raised, which the dashboard shows as alarming, never as a clean stop."""
    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path)
    engine = live.Engine(live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model)]), env={}))

    def broken() -> None:
        raise RuntimeError("boom in the model loader")
    monkeypatch.setattr(engine, "_load_model", broken)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    beat = json.loads((tmp_path / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert (beat["exit_code"], beat["stop_reason"]) == (1, "crash: RuntimeError: boom in the model loader")
    shutdown = journal(tmp_path, "events")[-1]
    assert (shutdown["event"], shutdown["exit_code"], shutdown["reason"]) == ("shutdown", 1, beat["stop_reason"])
    assert shutdown["level"] == "error" and "exited with code 1" in shutdown["message"]   # the notifier's alarm


@pytest.mark.parametrize("sig, keep", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_sigterm_and_sigint_stop_cleanly_cancelling_resting_entries_unless_kept(market, tmp_path, sig, keep):
    model = write_model_dir(tmp_path)
    # a maker entry far below the market: it rests until the engine is stopped
    probs = write_probabilities(tmp_path / "p.csv", {"2026-01-01T03:01:00Z": {"p_exec_long": 0.99, "p_dir_long": 0.6}})
    with exchange(market) as ex:
        proc = spawn(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--set",
                                "strategy.limit_offset_atr=5", "--lockstep-step", "5s",
                                *(["--keep-orders"] if keep else [])), tmp_path)
        wait_for(lambda: any(r.get("event") == "accepted" and r.get("kind") == "entry"
                             for r in journal(tmp_path, "trades")), 90, "a resting entry", proc)
        assert ex.call(lambda: ex.exchange.state())["open_orders"] == 1
        rc, out = stop(proc, sig)
        left = ex.call(lambda: ex.exchange.state())["open_orders"]
    assert rc == live.EXIT_OK, out[-2000:]
    assert left == (1 if keep else 0)
    assert journal(tmp_path, "events")[-1]["event"] == "shutdown"
    state = json.loads((tmp_path / "state" / f"bot_state_{SYMBOL}.json").read_text())
    assert state["version"] == live.STATE_VERSION and "execution" in state
    beat = json.loads((tmp_path / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert beat["phase"] == "stopping" and beat["model"].endswith("rank_1")
    assert (beat["exit_code"], beat["stop_reason"]) == (0, f"signal {sig.name}")   # the dashboard's STOPPED line


def test_psi_drift_is_zero_on_the_training_distribution_and_alerts_on_a_shift():
    import numpy as np
    import pandas as pd
    from models import training_quantiles
    rng = np.random.default_rng(3)
    train = pd.DataFrame({"a": rng.normal(size=20000), "b": rng.normal(size=20000)})
    q = training_quantiles(train)
    same = pd.DataFrame({"a": rng.normal(size=2000), "b": rng.normal(size=2000)})
    shifted = pd.DataFrame({"a": rng.normal(size=2000), "b": rng.normal(loc=1.0, size=2000)})
    assert max(live.drift_report(same, q, 2000).values()) < 0.05
    report = live.drift_report(shifted, q, 2000)
    assert list(report) == ["b", "a"] and report["b"] > 0.25
    assert live.worst_drift(report, live.drift_levels(report, {}, 0.25)) == ("b", report["b"])
    calm = live.drift_levels(report, {"b": report["b"] * 2, "a": 0.01}, 0.25)   # b moves this much by chance
    assert calm == {"b": report["b"] * 2, "a": 0.25} and live.worst_drift(report, calm) is None


def test_dry_run_follows_public_data_with_simulated_orders_and_its_own_state(market, tmp_path):
    """Dry-run (the default) against the paper exchange's public streams via --rest-url/--ws-url: bars and
    signals flow, the exchange receives no order, and the state file is kept apart from live state."""
    from paper_exchange import ExchangeThread, build_exchange
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with ExchangeThread(build_exchange(market, start="2026-01-01T03:00", rebase_time=True, speed=60.0)) as ex:
        url = ex.url
        proc = spawn([sys.executable, str(live.Path(live.__file__)),
                      "--symbol", SYMBOL, "--model-dir", str(model), "--probabilities", str(probs),
                      "--rest-url", url, "--ws-url", url.replace("http", "ws"), "--max-bars", "2"], tmp_path)
        proc.wait(timeout=300)
        out = output(proc)
        placed = ex.call(lambda: len(ex.exchange.engine.orders))
    assert proc.returncode == 0, out[-3000:]
    assert "dry-run: orders are simulated in process" in out
    assert len(journal(tmp_path, "signals")) >= 2 and placed == 0
    assert (tmp_path / "state" / f"bot_state_{SYMBOL}_dry-run.json").exists()
    assert not (tmp_path / "state" / f"bot_state_{SYMBOL}.json").exists()


def test_heartbeat_open_positions_follow_every_position_update(tmp_path, monkeypatch):
    """The heartbeat is rewritten as soon as a position push changes how many legs are open, not on the
    next 5 s beat, so the watchdog and dashboard never read a count the state file no longer holds."""
    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path)
    engine = live.Engine(live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model)]), env={}))
    engine._exec = engine._load_execution()
    beat = tmp_path / "state" / f"heartbeat_{SYMBOL}.json"
    saved = tmp_path / "state" / f"bot_state_{SYMBOL}_dry-run.json"
    for sizes, want in (({1: "0.5"}, 1), ({2: "0.3"}, 2), ({1: "0"}, 1), ({2: "0"}, 0)):
        engine._on_private("position", [{"positionIdx": i, "size": v, "updatedTime": "1"} for i, v in sizes.items()])
        state_open = sum(1 for v in json.loads(saved.read_text())["exchange_positions"].values() if v)
        assert json.loads(beat.read_text())["open_positions"] == state_open == want


@pytest.mark.parametrize("code, text, refused", [
    (110093, "expect Falling, but trigger_price[100.00] >= current[99.50]", True),
    (110092, "expect Rising, but trigger_price[99.00] <= current[99.50]??LastPrice", True),
    (10001, "StopLoss:3000 set for Buy position should lower than base_price:2990??LastPrice", True),
    (110007, "ab not enough for new order", False),
    (110017, "current position is zero, cannot fix reduce-only order qty", False),
    (10001, "params error: side invalid", False)])
def test_a_stop_refusal_is_recognised_by_kind_and_wording_not_by_one_code(code, text, refused):
    import exchange_client as exc
    err = exc.error_class(code)(f"place_order: retCode {code}: {text}", code=code)
    assert live.stop_refused(err) is refused


def test_events_received_together_are_all_applied_before_the_orders_they_call_for(tmp_path, monkeypatch):
    """An entry's fill and the fill of the stop the exchange attached to it can arrive in one batch (price went
    straight through the stop). Applied one by one, the entry's own stop went out first, was refused (price
    beyond it), and the market exit for the refused stop closed ANOTHER position's size on the shared hedge
    leg (found by parity). Applied as a batch first, the position is already closed when the refusal comes
    back: no exit is sent, and the other long stays held."""
    import exchange_client as exc
    import strategy as st
    monkeypatch.chdir(tmp_path)
    model = write_model_dir(tmp_path)
    engine = live.Engine(live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model)]), env={}))
    ex = engine._exec = engine._load_execution()
    day, breakout = 1_767_225_600, {"p_exec_long": 0.0, "p_exec_short": 0.0, "p_dir_long": 0.99, "p_dir_short": 0.0}
    entries = [ex.on_bar_close(st.Bar(index=i, time=day + 60 * i, close=100.0 + i, atr=1.0, probs=breakout))[0]
               for i in (0, 1)]
    ex.on_event(__import__("execution").ExecEvent("fill", entries[0].order_link_id, (day + 60) * 1000,
                                                  exec_id="a-1", qty=entries[0].qty, price=100.0, fee=0.1))
    sent: list[str] = []

    def create(req):
        sent.append(req.kind)
        if req.kind == "sl":
            raise exc.RejectedError("place_order: retCode 110093: expect Falling, but trigger_price[99.00] >= "
                                    "current[97.00]", code=110093)
    monkeypatch.setattr(engine, "_create", create)
    monkeypatch.setattr(engine, "_cancel", lambda req: sent.append("cancel " + req.kind))
    second = entries[1]
    fill = {"orderLinkId": second.order_link_id, "execId": "b-1", "execQty": str(second.qty), "execPrice": "101.0",
            "execFee": "0.1", "execTime": str((day + 120) * 1000), "execType": "Trade"}
    stop = {"orderId": "att-1", "orderLinkId": "", "stopOrderType": "PartialStopLoss", "side": "Sell",
            "triggerPrice": str(second.stop_loss), "qty": str(second.qty), "reduceOnly": True,
            "orderStatus": "Filled", "updatedTime": str((day + 121) * 1000)}
    stop_fill = {**stop, "execId": "b-2", "execQty": str(second.qty), "execPrice": "97.0", "execFee": "0.1",
                 "execTime": str((day + 121) * 1000), "execType": "Trade"}
    for item in (("private", "execution", [fill], 0), ("private", "order", [stop], 0),
                 ("private", "execution", [stop_fill], 0)):
        engine.events.put(item)
    engine._drain(timeout=0)
    assert sent == ["tp", "sl", "cancel tp", "cancel sl"], "the refused stop's position was closed: no exit"
    rejected = [r for r in journal(tmp_path, "trades") if r["event"] == "rejected"]
    assert len(rejected) == 1 and "110093" in rejected[0]["reason"], "a refusal is journaled once"
    assert [p.position_id for p in ex.slots if p is not None] == [entries[0].position_id]
