"""train.py end to end on synthetic markets: verdicts, artifacts, reproduction, distributed studies, bad input."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

import feature_engine
import market_sim
import train
from config import GlobalConfig
from conftest import ROOT
from postgres_server import postgres_server
import validation

SIM_DAYS = 14
# 1m bars: the planted signal leads by 15-60 minutes. The demo's split (development 60%, OOS-1 15%) leaves a
# Super-OOS exam of ~2.6 days (of 14, after warm-up and gaps). Small models and 4-group CPCV keep a
# trial to a few seconds; the search logic is the default one.
FAST = ["--timeframe", "1m", "--set", "tune.n_estimators=[30,80]", "--set", "tune.num_leaves=[4,16]",
        "--set", "tune.cpcv_groups=4", "--set", "tune.cpcv_test_groups=1",
        "--set", f"tune.dev_fraction={train.DEMO_SPLIT[0]}", "--set", f"tune.oos1_fraction={train.DEMO_SPLIT[1]}"]
MODEL_FILES = ["exec_long.txt", "exec_short.txt", "dir_long.txt", "dir_short.txt", "features.json",
               "params.json", "report.html"]


def run_cli(script: str, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def noise_dir(tmp_path_factory) -> Path:
    """A market in which nothing observable predicts returns (alpha 0)."""
    return market_sim.simulate(symbol="NOISEUSDT", days=SIM_DAYS, seed=11, alpha=0.0,
                               out=str(tmp_path_factory.mktemp("noise")), book_interval="2s", levels=50)


@pytest.fixture(scope="session")
def alpha_dir(tmp_path_factory) -> Path:
    """A market with the planted, tradable alpha (alpha 1)."""
    return market_sim.simulate(symbol="ALPHAUSDT", days=SIM_DAYS, seed=5, alpha=1.0,
                               out=str(tmp_path_factory.mktemp("alpha")), book_interval="2s", levels=50)


def train_args(data_dir: Path, symbol: str, trials: int, *extra: str) -> list[str]:
    return ["--symbol", symbol, "--data-dir", str(data_dir), "--trials", str(trials), "--candidates", "3",
            *FAST, *extra]


def full_run(data_dir: Path, symbol: str, work: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """An 8-trial study through to the verdict and the ranked artifacts."""
    proc = run_cli("train.py", train_args(data_dir, symbol, 8), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "models_v9" / symbol, proc


@pytest.fixture(scope="session")
def noise_run(noise_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return full_run(noise_dir, "NOISEUSDT", tmp_path_factory.mktemp("noise_run"))


@pytest.fixture(scope="session")
def alpha_run(alpha_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return full_run(alpha_dir, "ALPHAUSDT", tmp_path_factory.mktemp("alpha_run"))


def read_params(rank_dir: Path) -> dict:
    return json.loads((rank_dir / "params.json").read_text())


def test_random_walk_is_never_called_an_edge_and_is_still_saved(noise_run) -> None:
    root, proc = noise_run
    params = read_params(root / "rank_1")
    assert params["verdict_code"] in ("NO EDGE", "INCONCLUSIVE"), proc.stdout
    assert params["edge"] is False and params["verdict"].startswith(params["verdict_code"])
    assert params["verdict_code"] in proc.stdout
    assert all((root / "rank_1" / name).is_file() for name in MODEL_FILES)


def test_planted_alpha_champion_trades_both_legs_profitably_and_is_judged_by_its_mintrl(alpha_run) -> None:
    root, proc = alpha_run
    params = read_params(root / "rank_1")
    exam = params["trades"]["super_oos"]
    assert exam["maker_trades"] > 0 and exam["taker_trades"] > 0, exam   # both legs of the hybrid fire
    assert params["metrics"]["super_oos"]["total_return"] > 0, proc.stdout  # and the planted edge pays
    assert params["verdict_code"] != "NO STRATEGY" and params["verdict"] in proc.stdout
    study = params["metrics"]["study"]
    if params["verdict_code"] == "EDGE":
        assert study["deflated_sharpe"] >= 0.95 and study["super_oos_periods"] >= study["min_track_record_periods"]
    assert f"{exam['maker_trades']} maker" in proc.stdout and f"Super-OOS {study['super_oos_days']:.1f} days" \
        in proc.stdout


def test_artifacts_describe_the_model_completely(alpha_run) -> None:
    root, _ = alpha_run
    ranks = sorted(p.name for p in root.glob("rank_*"))
    assert ranks == ["rank_1", "rank_2", "rank_3"]
    for rank in ranks:
        assert all((root / rank / name).is_file() for name in MODEL_FILES), rank
        assert not list((root / rank).glob("*.pkl"))
    params = read_params(root / "rank_1")
    cfg = GlobalConfig.from_dict(params["config"])
    assert cfg.symbol == "ALPHAUSDT" and params["thresholds"] == {
        name: getattr(cfg.strategy, name) for name in ("exec_threshold", "direction_threshold", "aggressive_threshold")}
    assert set(params["top_fractions"]) == {"exec_top", "direction_top", "aggressive_top"}
    for leg in ("maker_trades", "taker_trades"):
        assert params["trades"]["oos1"][leg] == params["metrics"]["oos1"][leg]
        assert params["trades"]["super_oos"][leg] == params["metrics"]["super_oos"][leg]
    assert len(params["data"]["fingerprint"]) == 16 and params["data"]["bars"] > 0
    splits = params["splits"]
    assert splits["dev"][1] < splits["oos1"][0] < splits["oos1"][1] < splits["super_oos"][0]
    assert params["trained_on"] == splits["dev"]          # the exam model is the OOS-1-qualified one, as it ships
    assert set(params["versions"]) >= {"lightgbm", "optuna", "numpy", "pandas"}
    meta = json.loads((root / "rank_1" / "features.json").read_text())
    assert meta["features"] == feature_engine.feature_names(cfg)
    assert {name: m["rounds"] for name, m in meta["models"].items()} == dict.fromkeys(
        ["exec_long", "exec_short", "dir_long", "dir_short"], cfg.model.n_estimators)  # what CPCV scored ships
    html = (root / "rank_1" / "report.html").read_text()
    for section in ["Super-OOS", "OOS-1", "CPCV paths", "PBO", "Optimisation history", "Parameter importance",
                    "Feature importance", "Calibration", "Assumptions"]:
        assert section in html, section
    second = read_params(root / "rank_2")   # never examined: no borrowed verdict, no EDGE flag for the live gate
    assert second["rank"] == 2 and second["edge"] is False and second["verdict_code"] == "NOT EXAMINED"
    assert second["verdict"].startswith(f"NOT EXAMINED: rank 2 (trial {second['trial']})")
    assert f"its verdict: {params['verdict_code']}" in second["verdict"] and "super_oos" not in second["metrics"]


def test_the_report_shows_the_champion_on_an_independent_market_as_a_simulator_property(alpha_run) -> None:
    root, _ = alpha_run
    params = read_params(root / "rank_1")
    sim = json.loads((Path(params["data"]["data_dir"]) / "simulation.json").read_text())
    html = (root / "rank_1" / "report.html").read_text()
    title = f"Independent synthetic market (seed {sim['seed'] + train.INDEPENDENT_SEED_OFFSET}, alpha 1, "
    assert "A property of the simulator, not evidence about real markets" in html and title in html
    assert f"the champion (trial {params['trial']})" in html
    run = re.search(re.escape(title) + r"[^:]*: ([\d.]+) days, (\d+) trades \((\d+) maker, (\d+) taker\)", html)
    assert run and float(run[1]) > 2.0 and int(run[2]) > 0, html[:2000]   # the champion traded that market
    assert "A property of the simulator" not in (root / "rank_2" / "report.html").read_text()


def test_backtest_cli_reproduces_the_super_oos_numbers_exactly(alpha_run, tmp_path) -> None:
    root, _ = alpha_run
    params = read_params(root / "rank_1")
    out = tmp_path / "bt"
    proc = run_cli("backtest.py", ["--config", str(root / "rank_1" / "params.json"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trades"] > 0
    assert metrics == params["metrics"]["super_oos"]


def test_backtest_cli_trades_the_requested_days_and_warns_inside_the_training_span(alpha_run, tmp_path) -> None:
    root, _ = alpha_run
    params = read_params(root / "rank_1")
    day = (pd.Timestamp(params["splits"]["dev"][0]) + pd.Timedelta(days=2)).strftime("%Y-%m-%d")
    out = tmp_path / "bt"
    proc = run_cli("backtest.py", ["--config", str(root / "rank_1" / "params.json"), "--out", str(out),
                                   "--start", day, "--end", day], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overlaps the data this model was tuned and trained on" in proc.stderr
    equity = pd.read_csv(out / "equity.csv", index_col="time", parse_dates=True)
    assert equity.index[0] == pd.Timestamp(day, tz="UTC")           # warm-up loaded before, not traded
    assert equity.index[-1] == pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1, minutes=-1)
    exam = run_cli("backtest.py", ["--config", str(root / "rank_1" / "params.json"), "--out", str(tmp_path / "x")],
                   tmp_path)
    assert exam.returncode == 0 and "overlaps" not in exam.stderr  # the Super-OOS slice is not in-sample


def _completed_in_file(db: Path) -> int:
    """COMPLETE trials in an Optuna SQLite file, read-only and without Optuna: polling with optuna.load_study
    would create the schema while train.py may be creating it too (a race that made train.py exit)."""
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return int(con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
    except sqlite3.Error:      # the schema is not there yet
        return 0


def _complete_trials(storage, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _two_workers(noise_dir: Path, cwd: Path, storage_url: str, trials: int) -> None:
    args = train_args(noise_dir, "NOISEUSDT", trials, "--storage", storage_url, "--study-name", "shared",
                      "--resume", "--tune-only")
    workers = [start_cli("train.py", args, cwd) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-3000:]


def test_two_workers_share_a_journal_file_study(noise_dir, tmp_path) -> None:
    journal = tmp_path / "study.journal"
    _two_workers(noise_dir, tmp_path, f"journal:{journal}", trials=6)
    from optuna.storages.journal import JournalFileBackend
    done = _complete_trials(optuna.storages.JournalStorage(JournalFileBackend(str(journal))), "shared")
    assert len(done) == 6
    assert len({t.user_attrs["worker"] for t in done}) == 2


def test_two_workers_share_a_postgresql_study(noise_dir, tmp_path) -> None:
    with postgres_server() as url:
        _two_workers(noise_dir, tmp_path, url, trials=6)
        done = _complete_trials(url, "shared")
        assert len(done) == 6
        assert len({t.user_attrs["worker"] for t in done}) == 2


def test_ctrl_c_stops_after_the_running_trial_and_resume_finishes(noise_dir, tmp_path) -> None:
    args = train_args(noise_dir, "NOISEUSDT", 5)
    proc = start_cli("train.py", args, tmp_path)
    db = tmp_path / "models_v9" / "NOISEUSDT" / "study.db"
    storage = f"sqlite:///{db}"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not _completed_in_file(db):
        time.sleep(0.5)
    assert proc.poll() is None, f"train.py exited with {proc.returncode} before a trial completed"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert "continue with --resume" in out and "Traceback" not in err
    study = optuna.load_study(study_name="NOISEUSDT_1m", storage=storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL not in states and optuna.trial.TrialState.RUNNING not in states
    assert 1 <= len(states) < 5
    again = run_cli("train.py", args + ["--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_complete_trials(storage, "NOISEUSDT_1m")) == 5
    assert (tmp_path / "models_v9" / "NOISEUSDT" / "rank_1" / "params.json").is_file()


def test_a_worker_that_loses_the_sqlite_schema_race_retries(tmp_path, monkeypatch) -> None:
    """Two processes opening a fresh SQLite study file race to create its schema; SQLite's loser sees
    'table ... already exists' (an OperationalError, optuna issues 1092/4621). open_storage retries and finds
    the schema; any other OperationalError is a clear TrainError."""
    import sqlalchemy.exc
    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kw)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(train.time, "sleep", lambda s: None)
    assert train.open_storage(f"sqlite:///{tmp_path / 'study.db'}") is not None and len(calls) == 2

    def broken(url, **kw):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("unable to open database file"))
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(train.TrainError, match="unable to open database file"):
        train.open_storage(f"sqlite:///{tmp_path / 'nowhere' / 'study.db'}")


def test_resumed_and_parallel_studies_draw_new_points(tmp_path) -> None:
    cfg = GlobalConfig(symbol="NOISEUSDT")
    cfg.tune.trials = 12                      # 4 random start-up trials per run, as in a real study
    storage = train.open_storage(f"sqlite:///{tmp_path / 'study.db'}")

    def draw(trial: optuna.Trial) -> float:
        train.trial_config(trial, cfg)
        return 0.0
    for _ in range(3):                        # a fresh run, then resumed twice: every point is new
        train.create_study(cfg, storage).optimize(draw, n_trials=3)
    for worker in (101, 102):                 # two workers joining at the same trial count
        train.create_study(cfg, storage, worker).optimize(draw, n_trials=2)
    study = optuna.load_study(study_name="NOISEUSDT_5m", storage=storage)
    points = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(points) == 13 and len(set(points)) == 13
    other = train.open_storage(f"sqlite:///{tmp_path / 'other.db'}")
    train.create_study(cfg, other).optimize(draw, n_trials=3)  # a fresh study with the same seed is reproducible
    first = [json.dumps(t.params, sort_keys=True) for t in optuna.load_study(study_name="NOISEUSDT_5m",
                                                                             storage=other).trials]
    assert first == points[:3]


def test_the_trial_count_of_the_deflated_sharpe_counts_distinct_completed_trials_only() -> None:
    study = optuna.create_study(direction="maximize")
    for x in (1.0, 2.0, 1.0, 3.0):            # one repeated point
        study.enqueue_trial({"x": x})

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 10.0)
        if x == 3.0:
            raise optuna.TrialPruned()
        return x
    study.optimize(objective, n_trials=4)
    study.optimize(lambda t: float("nan"), n_trials=1)  # a failed trial
    assert len(study.trials) == 5
    assert [t.params["x"] for t in train.distinct_complete(study)] == [1.0, 2.0]


def test_a_second_fresh_run_refuses_to_overwrite_the_study(noise_dir, tmp_path) -> None:
    db = tmp_path / "models_v9" / "NOISEUSDT"
    db.mkdir(parents=True)
    optuna.create_study(study_name="NOISEUSDT_1m", storage=f"sqlite:///{db / 'study.db'}").optimize(
        lambda trial: 0.0, n_trials=1)
    proc = run_cli("train.py", train_args(noise_dir, "NOISEUSDT", 2), tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "too_few_bars", "bad_timeframe",
                                  "unreachable_storage", "other_symbol", "span_outside_data", "reversed_span"])
def test_bad_input_gives_a_clear_error_without_traceback(case, noise_dir, tmp_path) -> None:
    args = {
        "missing_dir": ["--data-dir", str(tmp_path / "nope")],
        "empty_dir": ["--data-dir", str(tmp_path)],
        "too_few_bars": ["--data-dir", str(noise_dir), "--timeframe", "1h"],
        "bad_timeframe": ["--data-dir", str(noise_dir), "--timeframe", "2m"],
        "unreachable_storage": ["--data-dir", str(noise_dir), "--storage",
                                "postgresql://user:s3cret@127.0.0.1:1/optuna"],
        "other_symbol": ["--data-dir", str(noise_dir), "--symbol", "BTCUSDT"],
        "span_outside_data": ["--data-dir", str(noise_dir), "--set", "data.start=2026-03-01"],
        "reversed_span": ["--data-dir", str(noise_dir), "--set", "data.start=2026-01-05", "--set", "data.end=2026-01-04"],
    }[case]
    proc = run_cli("train.py", ["--symbol", "NOISEUSDT", "--trials", "2", *args], tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    needle = {"missing_dir": "nope", "empty_dir": str(tmp_path), "too_few_bars": "too few bars",
              "bad_timeframe": "data.timeframe", "unreachable_storage": "cannot open study storage",
              "other_symbol": f"symbol BTCUSDT: the data in {noise_dir} is NOISEUSDT",
              "span_outside_data": f"start 2026-03-01: the data in {noise_dir} covers 2026-01-01 to 2026-01-14",
              "reversed_span": "data.end = '2026-01-04' is before config.data.start = '2026-01-05'"}[case]
    assert needle in proc.stderr
    if case != "too_few_bars":     # refused before a study or model folder is made (bars are needed to count)
        assert not (tmp_path / "models_v9").exists() and not (tmp_path / "data").exists()


def test_a_demo_with_a_bad_setting_is_refused_before_it_announces_or_makes_anything(tmp_path) -> None:
    proc = run_cli("train.py", ["--demo", "--days", "0"], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: days = 0: expected a whole number >= 1", \
        proc.stderr[-2000:]
    assert "generating" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []


def _result(total_return: float, regimes: list[str]) -> SimpleNamespace:
    return SimpleNamespace(metrics={"total_return": total_return}, trades=pd.DataFrame({"regime": regimes}))


def _stats(sr: float, sr0: float, periods: int) -> dict:
    """Study statistics as study_statistics makes them, for an exam of `periods` 15-minute returns."""
    day = 96
    mintrl = validation.min_track_record_length(sr, sr0, 0.0, 3.0)
    return {"super_oos_sharpe": sr, "super_oos_days": periods / day, "n_trials": 12, "pbo": 0.2,
            "deflated_sharpe": validation.probabilistic_sharpe(sr, sr0, periods, 0.0, 3.0),
            "min_track_record_days": mintrl / day}


@pytest.mark.parametrize("case,exam_ret,oos1_ret,oos1_trades,sr,sr0,periods,code", [
    ("nothing trades", 0.0, 0.0, [], 0.0, 0.05, 96, "NO STRATEGY"),
    ("exam loses", -0.02, 0.03, ["maker"], -0.05, 0.02, 96, "NO EDGE"),
    ("OOS-1 loses", 0.02, -0.01, ["taker"], 0.3, 0.02, 960, "NO EDGE"),
    ("no better than luck", 0.01, 0.01, ["maker"], 0.02, 0.05, 9600, "NO EDGE"),
    ("long enough exam", 0.05, 0.02, ["maker", "taker"], 0.3, 0.05, 96, "EDGE"),
    ("too short exam", 0.01, 0.01, ["maker", "taker"], 0.1, 0.05, 96, "INCONCLUSIVE"),
])
def test_verdicts_follow_the_minimum_track_record_length(case, exam_ret, oos1_ret, oos1_trades, sr, sr0, periods,
                                                          code) -> None:
    winner = train.Candidate(trial=None, cfg=None, oos1=_result(oos1_ret, oos1_trades),
                             final=_result(exam_ret, ["maker", "taker", "taker"] if oos1_trades else []))
    stats = _stats(sr, sr0, periods)
    got, text = train.verdict(winner, stats, super_oos_share=0.05)
    assert got == code and text.startswith(code), (case, text)
    assert f"Super-OOS {periods / 96:.1f} days" in text and "MinTRL" in text
    if oos1_trades:
        assert "3 trades (1 maker, 2 taker)" in text
    if code == "INCONCLUSIVE":   # the exam needs MinTRL - length more days; data needs that / Super-OOS share
        more = stats["min_track_record_days"] - periods / 96
        assert f"need ≈ {more:.1f} more days of exam" in text and f"≈ {more / 0.05:.0f} more days of data" in text


def test_an_edge_whose_orders_were_a_real_share_of_the_book_says_so() -> None:
    final = _result(0.05, ["maker", "taker", "taker"])
    final.metrics.update(trades=3, depth_share_median=0.3, depth_share_max=0.9, volume_share_median=2.0,
                         trades_over_depth_share=3)
    winner = train.Candidate(trial=None, cfg=None, oos1=_result(0.02, ["maker", "taker"]), final=final)
    code, text = train.verdict(winner, _stats(0.3, 0.05, 96), super_oos_share=0.05)
    assert code == "EDGE" and "But capacity: the median order was 30% of the book depth" in text


def test_demo_flags_name_the_market_and_honour_the_symbol(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args, folder, symbol in [([], "data/DEMOUSDT_Sim_s7_a1", "DEMOUSDT"),
                                 (["--demo-seed", "12", "--demo-alpha", "0"], "data/DEMOUSDT_Sim_s12_a0", "DEMOUSDT"),
                                 (["--symbol", "FOOUSDT", "--demo-alpha", "0.5", "--days", "30"],
                                  "data/FOOUSDT_Sim_s7_a0.5_d30", "FOOUSDT")]:
        (tmp_path / folder).mkdir(parents=True)          # present: nothing is generated
        parsed = train.build_parser().parse_args(["--demo", *args])
        cfg = train.demo_config(parsed, train.config_from_args(parsed))
        assert (cfg.data.data_dir, cfg.symbol, cfg.data.timeframe) == (folder, symbol, "1m")
    assert GlobalConfig().data.data_dir == "data/DEMOUSDT_Sim_s7_a1"   # every script's default: the quickstart's
    help_text = train.build_parser().format_help()
    assert "CFG_" not in help_text and "(default: 20)" in help_text and ") (default" not in help_text


def test_a_demo_rerun_starts_a_fresh_study_and_says_so(tmp_path, capsys) -> None:
    storage = train.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    optuna.create_study(study_name="DEMOUSDT_1m", storage=storage).optimize(lambda t: 0.0, n_trials=2)
    (tmp_path / "DEMOUSDT" / "rank_1").mkdir(parents=True)
    train.fresh_demo_study(storage, "DEMOUSDT_1m", tmp_path, "DEMOUSDT")
    out = capsys.readouterr().out
    assert "fresh study 'DEMOUSDT_1m'" in out and "will be replaced" in out
    assert "DEMOUSDT_1m" not in {s.study_name for s in optuna.study.get_all_study_summaries(storage)}


def _span(returns: list[float], n_trades: int) -> tuple[SimpleNamespace, pd.Series]:
    """A two-day span's 15-minute returns and a run with n_trades trades."""
    index = pd.date_range("2026-01-01", periods=192, freq="15min", tz="UTC")
    r = pd.Series((returns * 192)[:192], index=index)
    result = SimpleNamespace(trades=pd.DataFrame({"regime": (["maker", "taker"] * n_trades)[:n_trades]}),
                             equity=pd.DataFrame({"equity": 10_000 * (1 + r).cumprod()}))
    return result, r


def test_scores_are_bounded_trade_aware_and_never_reward_not_trading() -> None:
    cfg = GlobalConfig()
    cfg.tune.min_trades_per_day = 5.0
    idle = train.span_score(*_span([0.0], 0), cfg)
    loser = train.span_score(*_span([-0.01, 0.002], 40), cfg)
    assert idle == train.NO_TRADES and -train.SCORE_BOUND <= loser < 0 and idle < loser  # a loser outranks idle
    lucky = train.span_score(*_span([0.01, 0.0099], 40), cfg)   # an absurd Sharpe stays under the bound
    assert 0.99 * train.SCORE_BOUND < lucky <= train.SCORE_BOUND
    steady, r = _span([0.002, -0.001], 40)
    few, _ = _span([0.002, -0.001], 2)                            # same returns, 2 trades in 2 days (< 5/day)
    full = train.span_score(steady, r, cfg)
    # 2 trades where 10 are due: shrunk by 2/10, and by the rarer leg's 1 trade where 5 per leg are due
    assert 0 < full < train.SCORE_BOUND and train.span_score(few, r, cfg) == pytest.approx(full * 0.2 * 0.2, rel=0.03)
    one_legged = SimpleNamespace(trades=pd.DataFrame({"regime": ["taker"] * 40}), equity=steady.equity)
    assert train.span_score(one_legged, r, cfg) == 0.0          # a hybrid whose maker half never fires


def test_a_short_lucky_oos1_cannot_outvote_the_cpcv_evidence() -> None:
    # demo seed 201: a trial losing in CPCV (-0.3) with 14 lucky OOS-1 trades (9.0) against a steady CPCV winner
    lucky = train.evidence_weighted_score(-0.3, 8000, 9.0, 2000)
    steady = train.evidence_weighted_score(4.1, 8000, 1.8, 2000)
    assert lucky == pytest.approx(-0.3 * 0.8 + 9.0 * 0.2) and steady > lucky
