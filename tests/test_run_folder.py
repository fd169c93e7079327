"""The output folder: files, other people's folders, unwritable places and a second run are refused before the model loads."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.policy import HFPolicy
from pref.run_folder import LOCK_FILE, claim_output_dir


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model loads: the folder must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(HFPolicy, "load_model", refuse)


def pref_run(out, prefs_file):
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--steps", "1", "--device", "cpu",
                                      "--output-dir", str(out)])
    assert not isinstance(result.exception, AssertionError), result.exception
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    return line


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, prefs_file, no_model):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    line = pref_run(target, prefs_file)
    assert line == f"Error: --output-dir {target} is a file, not a folder; choose a folder path"
    assert target.read_text() == "mine"
    line = pref_run(target / "run", prefs_file)  # under a file: the system's own reason, in one line
    assert line.startswith(f"Error: cannot create --output-dir {target / 'run'}: Not a directory (ENOTDIR)")


def test_a_folder_that_is_not_a_pref_run_is_left_alone(tmp_path, prefs_file, no_model):
    mine = tmp_path / "mine"
    for name, text in [("final/model.bin", "weights"), ("checkpoint-000001/notes.txt", "notes"), ("metrics.jsonl", '{"a": 1}\n')]:
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = snapshot(mine)
    line = pref_run(mine, prefs_file)
    assert line.startswith(f"Error: --output-dir {mine} is not empty and holds no pref run (it has checkpoint-000001, final, metrics.jsonl)")
    assert snapshot(mine) == before


def test_an_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    lock = claim_output_dir(str(tmp_path / "empty"), resuming=False)
    assert json.load(open(tmp_path / "empty" / LOCK_FILE))["pid"] == os.getpid()
    lock.release()
    assert list((tmp_path / "empty").iterdir()) == []


def mount_tmpfs(path, options):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return path


@pytest.fixture
def read_only_dir(tmp_path):
    path = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_folder_is_refused_before_the_model_loads(read_only_dir, prefs_file, no_model):
    line = pref_run(read_only_dir / "run", prefs_file)
    assert line.startswith(f"Error: cannot create --output-dir {read_only_dir / 'run'}: Read-only file system (EROFS); choose a writable")


def test_an_unwritable_folder_is_a_one_line_error(tmp_path, prefs_file, no_model, monkeypatch):
    # root writes anywhere, so the refusal is simulated where the lock file is created
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    line = pref_run(tmp_path / "run", prefs_file)
    assert line == f"Error: cannot write to --output-dir {tmp_path / 'run'}: Permission denied (EACCES); choose a writable --output-dir"


HOLD = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, prefs_file, no_model):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = pref_run(out, prefs_file)
        assert line.startswith(f"Error: --output-dir {out} is in use by another pref run (pid {holder.pid} on ")
        assert "since 2026-01-01 00:00:00); wait for it to finish or choose another --output-dir" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: it could not clean up): its lock is stale and taken over
    lock = claim_output_dir(str(out), resuming=False)
    assert json.load(open(out / LOCK_FILE))["pid"] == os.getpid()
    lock.release()


def test_local_paths_are_made_absolute_in_a_copy_of_the_config(tmp_path, monkeypatch):
    from pref.config import build_config
    from pref.run_folder import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.jsonl").write_text("")
    (tmp_path / "preferences").mkdir()  # a folder named like a builder stays the builder's name
    config = build_config(flags={"dataset": ["prefs.jsonl", "preferences", "org/hub-name"], "dataset_options": {"path": "prefs.jsonl"}})
    absolute = absolute_paths(config, builders=["preferences"])
    assert absolute.dataset == [str(tmp_path / "prefs.jsonl"), "preferences", "org/hub-name"]
    assert absolute.dataset_options == {"path": str(tmp_path / "prefs.jsonl")}
    assert config.dataset == ["prefs.jsonl", "preferences", "org/hub-name"] and config.dataset_options == {"path": "prefs.jsonl"}


def test_a_refused_run_names_a_holder_that_has_just_locked_the_folder(tmp_path):
    """Between a run's lock and its record there is a moment when the lock file is empty: the refusal waits for the name."""
    import fcntl
    import threading

    from pref.errors import PrefError
    from pref.run_folder import RunLock

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, its record not written yet
    record = json.dumps({"pid": 4242, "host": "node-7", "started": "2026-12-01 04:00:00"}).encode()
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, record, 0))
    writer.start()
    try:
        with pytest.raises(PrefError, match=r"in use by another pref run \(pid 4242 on node-7 since 2026-12-01 04:00:00\)"):
            RunLock(str(tmp_path)).acquire()
    finally:
        writer.join()
        os.close(fd)
