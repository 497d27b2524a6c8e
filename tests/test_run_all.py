"""run_all.sh's bookkeeping: one run per runs folder, the partial folders of killed
runs, what --only runs and where its report goes (the cells themselves are the harness
tests' lmms-eval runs)."""

import fcntl
import os
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


def _stubbed_run_all(tmp_path):
    """run_all.sh copied beside stand-ins for its environment: lmms-eval writes a results
    file, dyrate-eval writes what a search writes, and both log their arguments."""
    shutil.copy(REPO / "run_all.sh", tmp_path)
    scripts, bin_dir = tmp_path / "scripts", tmp_path / ".venv" / "bin"
    scripts.mkdir()
    bin_dir.mkdir(parents=True)
    stubs = {
        scripts / "setup_env.sh": "exit 0",
        bin_dir / "lmms-eval": """echo "lmms-eval $*" >>"$CALLS"
while [ $# -gt 0 ]; do [ "$1" = --output_path ] && out=$2; shift; done
mkdir -p "$out/model" && echo {} >"$out/model/x_results.json\"""",
        bin_dir / "dyrate-eval": """echo "dyrate-eval $*" >>"$CALLS"
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
case "$out" in *.json) echo '{"K": null}' >"$out" ;; esac""",
        # the image token count and the predictors' K, as run_all.sh asks python for them
        bin_dir / "python": """case "$2" in *load_arch*) echo 144 ;; *) exec python3 "$@" ;; esac""",
    }
    for path, body in stubs.items():
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)
    (tmp_path / "dyrate_eval" / "embedded_llava").mkdir(parents=True)
    (tmp_path / "dyrate_eval" / "embedded_llava" / "config.json").write_text("{}")
    for target in ("0.6", "0.7"):
        predictor = tmp_path / "dyrate_eval" / "predictors" / f"embedded-flops{target}"
        predictor.mkdir(parents=True)
        (predictor / "predictor.json").write_text('{"K": 2}')

    def run(*arguments):
        calls = tmp_path / "calls.txt"
        calls.unlink(missing_ok=True)
        done = subprocess.run([str(tmp_path / "run_all.sh"), *arguments], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "CALLS": str(calls)})
        assert done.returncode == 0, done.stdout + done.stderr
        return calls.read_text().splitlines()

    return run


def test_only_runs_the_named_cells_and_reports_beside_them(tmp_path):
    """--only: the named cells and no search, no other cell; the report goes into the
    runs folder, never over results/ (which holds the whole grid's tables)."""
    run = _stubbed_run_all(tmp_path)
    calls = run("--only", "original,fastv_K2_R0.5")
    cells = [call.split("--output_path ")[1].split()[0] for call in calls if call.startswith("lmms-eval")]
    assert cells == ["runs/embedded/original.partial", "runs/embedded/fastv_K2_R0.5.partial"]
    commands = [call.split()[1] for call in calls if call.startswith("dyrate-eval")]
    assert commands == ["latency", "summarize", "report"], calls
    assert "--out runs/embedded/report" in calls[-1]
    assert not (tmp_path / "results").exists()

    calls = run("--only", "gsearch_kl,vtw_searched")  # a schedule cell runs its search first
    searches = [call.split()[1] for call in calls if call.startswith("dyrate-eval") and call.split()[1] not in
                ("latency", "summarize", "report")]
    assert searches == ["gsearch", "find-vtw-k"], calls
    cells = [call.split("--output_path ")[1].split()[0] for call in calls if call.startswith("lmms-eval")]
    assert cells == ["runs/embedded/gsearch_kl.partial"]  # the stub's VTW search found no K: no cell
