"""run_all.sh's bookkeeping: one run per runs folder, and the partial folders of killed
runs (the cells themselves are the harness tests' lmms-eval runs)."""

import fcntl
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_second_run_all_stops_at_once_and_leaves_the_first_ones_cell_alone(tmp_path):
    runs = tmp_path / "runs"
    in_progress = runs / "original.partial"
    in_progress.mkdir(parents=True)
    with open(runs / ".run_all.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first run_all.sh holds while it runs
        done = subprocess.run([str(REPO / "run_all.sh"), "--limit", "1", "--runs", str(runs)], capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"run_all.sh: another run_all.sh is running into {runs} (it holds {runs}/.run_all.lock)" in done.stderr
    assert in_progress.is_dir(), "the running job's unfinished cell must survive"
    assert "[setup]" not in done.stdout, "it stops before doing anything"


def test_a_new_run_all_removes_the_partial_folders_a_killed_one_left(tmp_path):
    """run_all.sh, copied beside a setup step that stops it right after its start (the
    cells would take the real job's time): partial cells, also one an old run_all.sh
    nested into a finished cell, are gone; finished cells stay."""
    shutil.copy(REPO / "run_all.sh", tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup_env.sh").write_text("#!/usr/bin/env bash\necho 'setup reached' >&2\nexit 3\n")
    (tmp_path / "scripts" / "setup_env.sh").chmod(0o755)
    runs = tmp_path / "runs"
    finished = runs / "fastv" / "model" / "x_results.json"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")
    for partial in (runs / "original.partial", runs / "fastv" / "fastv.partial"):
        (partial / "model").mkdir(parents=True)
    done = subprocess.run([str(tmp_path / "run_all.sh"), "--limit", "1", "--runs", "runs"], capture_output=True, text=True, timeout=60)
    assert "setup reached" in done.stderr, done.stdout + done.stderr
    assert sorted(path.relative_to(runs).as_posix() for path in runs.rglob("*")) == [
        ".run_all.lock", "fastv", "fastv/model", "fastv/model/x_results.json"]
