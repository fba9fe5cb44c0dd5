"""train.py end to end on synthetic markets: verdicts, artifacts, reproduction, distributed studies, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import feature_engine
import market_sim
from config import GlobalConfig
from conftest import ROOT
from postgres_server import postgres_server

SIM_DAYS = 14
# 1m bars: the planted signal leads by 15-60 minutes, and two weeks give a Super-OOS slice of ~11 hours.
# Small models and 4-group CPCV keep a trial to a few seconds; the search logic is the default one.
FAST = ["--timeframe", "1m", "--set", "tune.n_estimators=[30,80]", "--set", "tune.num_leaves=[4,16]",
        "--set", "tune.cpcv_groups=4", "--set", "tune.cpcv_test_groups=1"]
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


def test_random_walk_gets_a_no_edge_verdict_and_is_still_saved(noise_run) -> None:
    root, proc = noise_run
    assert "NO EDGE" in proc.stdout
    params = read_params(root / "rank_1")
    assert params["edge"] is False and params["verdict"].startswith("NO EDGE")
    assert all((root / "rank_1" / name).is_file() for name in MODEL_FILES)


def test_planted_alpha_is_found_out_of_sample(alpha_run) -> None:
    root, proc = alpha_run
    params = read_params(root / "rank_1")
    assert "EDGE: the evidence supports an edge" in proc.stdout, proc.stdout
    assert params["edge"] is True
    assert params["metrics"]["super_oos"]["total_return"] > 0
    assert params["metrics"]["study"]["deflated_sharpe"] >= 0.95


def test_artifacts_describe_the_model_completely(alpha_run) -> None:
    root, _ = alpha_run
    ranks = sorted(p.name for p in root.glob("rank_*"))
    assert ranks == ["rank_1", "rank_2", "rank_3"]
    for rank in ranks:
        assert all((root / rank / name).is_file() for name in MODEL_FILES), rank
        assert not list((root / rank).glob("*.pkl"))
    params = read_params(root / "rank_1")
    cfg = GlobalConfig.from_dict(params["config"])
    assert cfg.symbol == "ALPHAUSDT" and params["thresholds"]["exec_threshold"] == cfg.strategy.exec_threshold
    assert len(params["data"]["fingerprint"]) == 16 and params["data"]["bars"] > 0
    splits = params["splits"]
    assert splits["dev"][1] < splits["oos1"][0] < splits["oos1"][1] < splits["super_oos"][0]
    assert params["trained_on"][1] == splits["oos1"][1]
    assert set(params["versions"]) >= {"lightgbm", "optuna", "numpy", "pandas"}
    meta = json.loads((root / "rank_1" / "features.json").read_text())
    assert meta["features"] == feature_engine.feature_names(cfg)
    assert {name: m["rounds"] for name, m in meta["models"].items()} == dict.fromkeys(
        ["exec_long", "exec_short", "dir_long", "dir_short"], cfg.model.n_estimators)  # what CPCV scored ships
    html = (root / "rank_1" / "report.html").read_text()
    for section in ["Super-OOS", "OOS-1", "CPCV paths", "PBO", "Optimisation history", "Parameter importance",
                    "Feature importance", "Calibration", "Assumptions"]:
        assert section in html, section
    assert read_params(root / "rank_2")["rank"] == 2


def test_backtest_cli_reproduces_the_super_oos_numbers_exactly(alpha_run, tmp_path) -> None:
    root, _ = alpha_run
    params = read_params(root / "rank_1")
    out = tmp_path / "bt"
    proc = run_cli("backtest.py", ["--config", str(root / "rank_1" / "params.json"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trades"] > 0
    assert metrics == params["metrics"]["super_oos"]


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
    storage = f"sqlite:///{tmp_path / 'models_v9' / 'NOISEUSDT' / 'study.db'}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if _complete_trials(storage, "NOISEUSDT_1m"):
                break
        except (KeyError, Exception):  # the study does not exist yet
            pass
        time.sleep(0.5)
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


def test_a_second_fresh_run_refuses_to_overwrite_the_study(noise_dir, tmp_path) -> None:
    db = tmp_path / "models_v9" / "NOISEUSDT"
    db.mkdir(parents=True)
    optuna.create_study(study_name="NOISEUSDT_1m", storage=f"sqlite:///{db / 'study.db'}").optimize(
        lambda trial: 0.0, n_trials=1)
    proc = run_cli("train.py", train_args(noise_dir, "NOISEUSDT", 2), tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "too_few_bars", "bad_timeframe",
                                  "unreachable_storage"])
def test_bad_input_gives_a_clear_error_without_traceback(case, noise_dir, tmp_path) -> None:
    args = {
        "missing_dir": ["--data-dir", str(tmp_path / "nope")],
        "empty_dir": ["--data-dir", str(tmp_path)],
        "too_few_bars": ["--data-dir", str(noise_dir), "--timeframe", "1h"],
        "bad_timeframe": ["--data-dir", str(noise_dir), "--timeframe", "2m"],
        "unreachable_storage": ["--data-dir", str(noise_dir), "--storage",
                                "postgresql://user:s3cret@127.0.0.1:1/optuna"],
    }[case]
    proc = run_cli("train.py", ["--symbol", "NOISEUSDT", "--trials", "2", *args], tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    needle = {"missing_dir": "nope", "empty_dir": str(tmp_path), "too_few_bars": "too few bars",
              "bad_timeframe": "data.timeframe", "unreachable_storage": "cannot open study storage"}[case]
    assert needle in proc.stderr
