"""One run per output folder (issue 15, item 1): while another process holds a folder, `ingest`,
`pretrain`, `finetune` and `demo` into it exit 2 at once, naming the folder and the holder's
pid, and write nothing; after the holder is killed with SIGKILL (no cleanup) the next run takes
the folder over, even while a child the holder forked lives on."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from usfmae_fast.runtime.lock import LOCK_NAME, FolderBusy, output_lock
from usfmae_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import os, sys, time
from usfmae_fast.runtime.lock import output_lock
with output_lock(sys.argv[1], "holder"):
    if len(sys.argv) > 2:  # a forked child (as a DataLoader worker) that outlives us
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
    print("held", flush=True)
    time.sleep(120)
"""


class Holder:
    """A process holding ``folder``'s lock (``fork``: plus a forked child that sleeps)."""

    def __init__(self, folder: Path, fork: bool = False):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)] +
                                     (["fork"] if fork else []), env=env, stdout=subprocess.PIPE,
                                     text=True)
        self.child = int(self.proc.stdout.readline()) if fork else None
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def close(self) -> None:
        for pid in filter(None, (self.proc.pid if self.proc.poll() is None else None,
                                 self.child)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


@pytest.fixture
def holder():
    made = []
    yield lambda folder, **kw: made.append(Holder(folder, **kw)) or made[-1]
    for h in made:
        h.close()


def _png_folder(folder: Path, count: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _commands(tmp_path: Path, out: Path) -> dict[str, list[str]]:
    from _finetune_data import make_labelled_set

    labels = make_labelled_set(tmp_path / "labelled", per_class=4)
    return {
        "ingest": ["ingest", str(_png_folder(tmp_path / "raw")), "--out", str(out), "--quiet",
                   "--workers", "1"],
        "pretrain": ["pretrain", "--preset", "demo", "--out", str(out), "--quiet", "--steps", "1"],
        "finetune": ["finetune", "--labels", str(labels), "--out", str(out), "--models",
                     "test_resnet", "--quick", "--quiet"],
        "demo": ["demo", "--quick", "--out", str(out), "--quiet"],
    }


def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder(tmp_path, holder, capsys):
    out = tmp_path / "out"
    held = holder(out)
    for command, argv in _commands(tmp_path, out).items():
        started = time.perf_counter()
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"usfmae-fast {command}: output folder {str(out)!r} is in use "
                              f"by another run (pid {held.proc.pid} on host "), err
        assert err.count("\n") == 1, err  # one line, no traceback
        assert time.perf_counter() - started < 10, command  # at once, not after the work
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], command  # nothing written
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == held.proc.pid and record["command"] == "holder"


def test_after_kill_9_of_the_holder_the_next_run_takes_the_folder(tmp_path, holder, capsys):
    out = tmp_path / "out"
    held = holder(out, fork=True)  # its forked child stays alive after the kill
    argv = _commands(tmp_path, out)["ingest"]
    assert main(argv) == 2 and f"pid {held.proc.pid}" in capsys.readouterr().err
    held.kill()
    os.kill(held.child, 0)  # the child is alive and still has the lock file open
    with pytest.warns(RuntimeWarning, match=rf"pid {held.proc.pid} .*ended without releasing"):
        assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames_written"] == 3 and (out / "manifest.csv").is_file()
    assert (out / LOCK_NAME).read_text() == ""  # released: no record of a live run is left


def test_lock_is_reentrant_in_a_process_and_released_on_exit(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, "outer"):
        with output_lock(out, "inner"):  # e.g. the finetune CLI, then run_protocol
            record = json.loads((out / LOCK_NAME).read_text())
            assert (record["pid"], record["command"]) == (os.getpid(), "outer")
        probe = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom usfmae_fast.runtime.lock import output_lock\n"
             "with output_lock(sys.argv[1], 'probe'): pass", str(out)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        assert probe.returncode == 1 and "FolderBusy" in probe.stderr
        assert f"pid {os.getpid()}" in probe.stderr
    with output_lock(out, "again"):  # free again after the outer exit
        pass
    with pytest.raises(ValueError), output_lock(out, "raises"):
        raise ValueError("an error inside the run releases the folder too")
    with output_lock(out, "after the error"):
        pass
    assert not issubclass(FolderBusy, (ValueError, OSError))  # never mistaken for bad input


def test_ingest_from_python_holds_its_folder_too(tmp_path):
    from usfmae_fast.data.ingest import ingest
    out = tmp_path / "corpus"
    holder = Holder(out)
    try:
        with pytest.raises(FolderBusy, match=str(holder.proc.pid)):
            ingest([tmp_path / "nothing"], out)
    finally:
        holder.close()
    assert not (out / "manifest.csv").exists()
