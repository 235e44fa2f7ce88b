"""The job kit's pieces in one process: output publishing, the watchdog, the agreement.

The end-to-end behaviour under ``mpiexec`` is in test_failure_matrix.py; these pin the
mechanisms down where a race or a planted link can be arranged exactly.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from mpiattn.commands import jobkit
from mpiattn.errors import InputError, UserError
from mpiattn.io import outfile
from mpiattn.parallel import watchdog

# --- outfile ---------------------------------------------------------------------------


def test_temporaries_are_exclusive_unpredictable_and_get_the_usual_mode(tmp_path):
    a = outfile.Reservation.make(tmp_path / "out.h5", force=False)
    b = outfile.Reservation.make(tmp_path / "out.h5", force=False)
    assert a.tmp is None and list(tmp_path.iterdir()) == []  # nothing left by the checks
    ta, tb = a.create(), b.create()
    assert ta != tb and ta.parent == tb.parent == tmp_path
    assert f"-{os.getpid()}-" in ta.name and ta.name.startswith(".out.h5.")
    mask = os.umask(0)
    os.umask(mask)
    assert ta.stat().st_mode & 0o777 == 0o666 & ~mask
    a.discard()
    b.discard()
    assert list(tmp_path.iterdir()) == []


def test_two_writers_of_one_name_never_both_succeed(tmp_path):
    path = tmp_path / "out.h5"
    first = outfile.Reservation.make(path, force=False)
    second = outfile.Reservation.make(path, force=False)  # both checked before either wrote
    first.write(b"first")
    second.write(b"second")
    first.publish()
    with pytest.raises(outfile.OutputExists, match="created by someone else"):
        second.publish()
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_link_and_unlink_when_the_file_system_lacks_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(outfile, "_renameat2", lambda src, dst: False)
    (tmp_path / "a").write_bytes(b"a")
    outfile.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"a" and not (tmp_path / "a").exists()
    (tmp_path / "c").write_bytes(b"c")
    with pytest.raises(FileExistsError):
        outfile.rename_noreplace(tmp_path / "c", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"a"


def test_a_link_planted_over_the_temporary_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = outfile.Reservation.make(tmp_path / "out.h5", force=False)
    tmp = out.create()
    tmp.unlink()
    tmp.symlink_to(victim)
    with pytest.raises(OSError):
        out.write(b"payload")
    assert victim.read_bytes() == b"keep"


def test_force_replaces_a_symlink_at_the_output_not_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "out.h5").symlink_to(victim)
    with pytest.raises(UserError, match="exists"):
        outfile.Reservation.make(tmp_path / "out.h5", force=False)
    out = outfile.Reservation.make(tmp_path / "out.h5", force=True)
    out.write(b"new")
    out.publish()
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "out.h5").is_symlink() and (tmp_path / "out.h5").read_bytes() == b"new"


@pytest.mark.parametrize(("name", "message"), [
    ("x" * 256, "this file system allows 255"),
    ("bad-\udcff.h5", "not valid UTF-8"),
    ("missing/out.h5", "does not exist"),
    ("adir", "is a directory"),
])
def test_bad_names_are_refused_before_any_work(tmp_path, name, message):
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserError, match=message):
        outfile.Reservation.make(tmp_path / name, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_the_longest_legal_name_gets_a_temporary_that_fits(tmp_path):
    out = outfile.Reservation.make(tmp_path / ("é" * 126 + ".h5"), force=False)  # 255 bytes
    out.write(b"x")
    out.publish()
    assert out.path.read_bytes() == b"x"


def test_stale_notes_name_only_temporaries_whose_writer_is_gone(tmp_path):
    host = outfile._host()
    dead = tmp_path / f".out.h5.{host}-999999999-abcdefgh.tmp"
    alive = tmp_path / f".out.h5.{host}-{os.getpid()}-abcdefgh.tmp"
    elsewhere = tmp_path / ".out.h5.otherhost-999999999-abcdefgh.tmp"
    for p in (dead, alive, elsewhere):
        p.write_bytes(b"")
    note = outfile.stale_note(tmp_path / "out.h5")
    assert note is not None and dead.name in note
    assert alive.name not in note and elsewhere.name not in note
    dead.unlink()
    assert outfile.stale_note(tmp_path / "out.h5") is None


# --- watchdog ----------------------------------------------------------------------------


def test_a_wait_past_the_timeout_ends_the_job_naming_the_operation(capsys):
    codes = []
    dog = watchdog.Watchdog(0.3, codes.append, rank=0)
    dog.where.update(layer=3, site="mlp")
    with dog.waiting("Allreduce", "0-3"):
        deadline = time.monotonic() + 30  # a loaded machine delays the thread
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    assert codes == [watchdog.EXIT_TIMEOUT]
    err = capsys.readouterr().err
    assert "rank 0 waited" in err and "in Allreduce (layer 3, site mlp) with ranks 0-3" in err


def test_waits_within_the_timeout_and_a_zero_timeout_never_end_the_job():
    codes = []
    dog = watchdog.Watchdog(30.0, codes.append, rank=0)
    with dog.waiting("Barrier"):
        time.sleep(0.3)
    dog.timeout = 0
    with dog.waiting("Barrier"):
        time.sleep(0.5)
    assert codes == []


def test_a_signal_after_publishing_does_not_fail_the_job():
    dog = watchdog.Watchdog(0, lambda code: None, rank=0)
    dog._signal_mode = "exit"
    dog.finished = True
    dog._signalled(signal.SIGTERM)  # returns instead of ending the process
    assert dog.stop_requested == 0


def test_training_signals_set_a_flag_once():
    dog = watchdog.Watchdog(0, lambda code: None, rank=1)
    dog._signal_mode = "flag"
    dog._signalled(signal.SIGUSR1)
    assert dog.stop_requested == signal.SIGUSR1


def test_watched_communicators_are_real_ones():
    MPI = pytest.importorskip("mpi4py.MPI")
    comm = watchdog.watch(MPI.COMM_SELF)
    assert isinstance(comm, MPI.Intracomm) and comm.peers() == str(MPI.COMM_WORLD.Get_rank())
    sub = comm.Split(0, 0)
    assert isinstance(sub, watchdog._Watched)
    assert comm.allreduce(2) == 2
    assert watchdog.rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


# --- agreement ----------------------------------------------------------------------------


def test_differing_inputs_name_the_file_and_the_ranks():
    err = jobkit.disagreement([{"input.text 'a.txt'": "x"}, {"input.text 'a.txt'": "x"},
                                {"input.text 'a.txt'": "y"}, {"input.text 'a.txt'": "x"}])
    assert isinstance(err, InputError) and err.agreed
    assert "ranks differ in input.text 'a.txt'" in str(err)
    assert "ranks 0-1,3 vs ranks 2" in str(err) and "same file" in str(err)
    assert jobkit.disagreement([{"a": "x"}, {"a": "x"}]) is None


def test_preflight_drops_the_reservation_when_a_check_fails(tmp_path):
    MPI = pytest.importorskip("mpi4py.MPI")

    def check():
        raise InputError("input.text = 'x': missing")

    with pytest.raises(InputError) as err:
        jobkit.preflight(MPI.COMM_SELF, check, output=(str(tmp_path / "o.h5"), False))
    assert err.value.agreed and list(tmp_path.iterdir()) == []
    value, out = jobkit.preflight(MPI.COMM_SELF, lambda: (42, {"c": "d"}),
                                  output=(str(tmp_path / "o.h5"), False))
    assert value == 42 and out.path == tmp_path / "o.h5" and list(tmp_path.iterdir()) == []


def test_host_names_in_temporaries_are_file_name_safe(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node/1.example.org")
    assert "/" not in outfile._host() and "." not in outfile._host()
