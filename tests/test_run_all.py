"""run_all.sh's guard against a second copy of itself (the cells themselves are the
harness tests' lmms-eval runs)."""

import fcntl
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
