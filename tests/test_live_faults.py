"""Every paper-exchange fault while the engine trades gets its defined reaction and never a double order:
lost acks (settled by lookup), duplicated and reordered pushes (dropped / ordered by the lifecycle), HTTP 5xx
and 10006 bursts (retried), a book reset (resync) and dropped WebSockets (rebuilt, then reconciled)."""
from __future__ import annotations

import collections
import signal

import pytest

from live_support import busy_probabilities, engine_cmd, exchange, journal, make_market, spawn, stop, wait_for, \
    write_model_dir


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return make_market(tmp_path_factory.mktemp("market"))


def entries_placed(cwd) -> int:
    return sum(1 for r in journal(cwd, "trades") if r.get("event") == "placed" and r.get("kind") == "entry")


def test_faults_get_their_reaction_and_no_order_is_doubled(market, tmp_path):
    model = write_model_dir(tmp_path, **{"strategy.max_holding_bars": "3", "strategy.daily_loss_limit": "0.9"})
    probs = busy_probabilities(tmp_path / "p.csv")
    with exchange(market) as ex:
        faults = ex.exchange.faults
        ex.call(lambda: (setattr(faults, "lose_acks", 2), setattr(faults, "duplicate_pushes", 30),
                         setattr(faults, "reorder_pushes", 10)))
        proc = spawn(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--lockstep-step", "20s"),
                     tmp_path)
        wait_for(lambda: entries_placed(tmp_path) >= 3, 120, "three entries under lost acks and bad pushes", proc)
        ex.call(lambda: (setattr(faults, "http_5xx", 2), setattr(faults, "rate_limit_burst", 3),
                         setattr(faults, "book_reset", True)))
        wait_for(lambda: entries_placed(tmp_path) >= 5, 120, "entries through 5xx, 10006 and a book reset", proc)
        before = sum(1 for e in journal(tmp_path, "events") if e["event"] == "reconciled")
        ex.call(ex.exchange.drop_ws, "all")
        wait_for(lambda: sum(1 for e in journal(tmp_path, "events") if e["event"] == "reconciled") > before, 120,
                 "reconciliation after the private stream was rebuilt", proc)
        wait_for(lambda: entries_placed(tmp_path) >= 7, 120, "trading again after the rebuild", proc)
        rc, out = stop(proc, signal.SIGTERM)
        orders = ex.call(lambda: list(ex.exchange.engine.orders.values()))
    assert rc == 0, out[-3000:]
    assert faults.lose_acks == 0 and faults.duplicate_pushes == 0 and faults.http_5xx == 0
    assert "ack lost" in out or "already placed" in out, "a lost ack was settled by lookup"
    per_bar = collections.Counter((o.side, o.created // 60000) for o in orders if o.link_id and not o.reduce_only)
    assert per_bar and max(per_bar.values()) == 1, "one entry order per intent"
    assert len({o.link_id for o in orders if o.link_id}) == sum(1 for o in orders if o.link_id)
    assert not any(e["event"] == "external" for e in journal(tmp_path, "events")), "nothing mistaken for foreign"


def entry_requests(signal_record: dict) -> list[dict]:
    return [r for r in signal_record["requests"] if r["action"] == "create" and r["kind"] == "entry"]


def test_muted_pushes_close_entries_until_data_flows_again(market, tmp_path):
    """The exchange keeps the sockets open but pushes nothing (public and private): once the data is older than
    live.ws_stale_after, the stale-data gate closes entries; when pushes resume, entries resume."""
    model = write_model_dir(tmp_path, **{"strategy.max_holding_bars": "3", "strategy.daily_loss_limit": "0.9"})
    probs = busy_probabilities(tmp_path / "p.csv")
    with exchange(market) as ex:
        proc = spawn(engine_cmd(ex.url, model, market, "--probabilities", str(probs)), tmp_path)
        wait_for(lambda: any(entry_requests(s) for s in journal(tmp_path, "signals")), 120, "a first entry", proc)
        ex.call(lambda: setattr(ex.exchange.faults, "mute_pushes", True))
        wait_for(lambda: sum(s["reason"].startswith("stale") for s in journal(tmp_path, "signals")) >= 2, 120,
                 "two bars closed on stale data", proc)
        ex.call(lambda: setattr(ex.exchange.faults, "mute_pushes", False))
        muted = len(journal(tmp_path, "signals"))
        wait_for(lambda: any(entry_requests(s) for s in journal(tmp_path, "signals")[muted:]), 120,
                 "entries after the pushes resumed", proc)
        rc, out = stop(proc, signal.SIGTERM)
    assert rc == 0, out[-3000:]
    signals = journal(tmp_path, "signals")
    stale = [s for s in signals if s["reason"].startswith("stale")]
    assert len(stale) >= 2 and all(not s["entries_allowed"] and not entry_requests(s) for s in stale)
    assert any(e["event"] == "stale_data" for e in journal(tmp_path, "events"))
    resumed = [s for s in signals[muted:] if entry_requests(s)]
    assert resumed and resumed[0]["bar_ms"] > stale[-1]["bar_ms"]
