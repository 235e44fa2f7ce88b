"""``mpiattn.commands.progress.Progress``: timed plain lines off a terminal, a tqdm bar on one."""

from __future__ import annotations

import io
import re

import pytest

from mpiattn.commands.progress import Progress, duration


class Clock:
    """A fake ``perf_counter``: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Pipe(io.StringIO):
    """stderr as under mpiexec or in a Slurm log: not a terminal."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_lines_at_the_interval_with_fields_eta_and_a_final_line():
    clock, out = Clock(), Pipe()
    with Progress(100, "step", interval=10.0, stream=out, clock=clock) as bar:
        for i in range(100):  # 1 step every 0.5 s: 2 step/s, 50 s in all
            clock.now += 0.5
            bar.update(1, loss=7.0 - i / 100, lr=1e-4, tok_s=12345.6)
    got = lines(out)
    # first at the first update (t = 0.5), then every 10 s (t = 10.5, 20.5, ...), then final
    assert [line.split()[2] for line in got] == [
        "1/100", "21/100", "41/100", "61/100", "81/100", "100/100"]
    first, middle, final = got[0], got[2], got[-1]
    assert middle == ("mpiattn: step 41/100 (41%), 2 step/s, ETA 30s,"
                      " loss=6.6 lr=0.0001 tok_s=12346")
    assert first.startswith("mpiattn: step 1/100 (1%), 2 step/s, ETA 50s,")
    assert final == ("mpiattn: step 100/100 (100%), 2 step/s, 50s elapsed,"
                     " loss=6.01 lr=0.0001 tok_s=12346")


def test_updates_between_lines_print_nothing():
    clock, out = Clock(), Pipe()
    bar = Progress(1000, "step", interval=10.0, stream=out, clock=clock)
    bar.update()
    for _ in range(500):
        clock.now += 0.01  # 5 s in all: no line is due
        bar.update(1, loss=1.0)
    assert len(lines(out)) == 1
    clock.now += 5.0
    bar.update()
    assert len(lines(out)) == 2 and "step 502/1000" in lines(out)[1]


def test_resume_counts_rate_and_eta_from_this_process_only():
    clock, out = Clock(), Pipe()
    with Progress(1000, "step", start=900, stream=out, clock=clock) as bar:
        clock.now += 10.0
        bar.update(20)  # 20 steps in 10 s: 2 step/s, 80 to go: 40 s
    assert lines(out)[0] == "mpiattn: step 920/1000 (92%), 2 step/s, ETA 40s"
    assert lines(out)[-1] == "mpiattn: step 920/1000 (92%), 2 step/s, 10s elapsed"


def test_only_the_verbose_rank_prints():
    clock, out = Clock(), Terminal()
    with Progress(10, "step", verbose=False, stream=out, clock=clock) as bar:
        for _ in range(10):
            clock.now += 60.0
            bar.update(1, loss=1.0)
        bar.note("eval loss 3.2")
    assert out.getvalue() == "" and bar.done == 10


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    import tqdm

    made = []
    real = tqdm.tqdm

    def spy(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", spy)
    out = Terminal()
    with Progress(50, "step", start=5, stream=out) as bar:
        bar.update(5, loss=2.5)
        bar.note("a message")
        assert isinstance(bar._bar, real)
    assert made and made[0]["total"] == 50 and made[0]["initial"] == 5
    assert made[0]["file"] is out and made[0]["unit"] == "step"
    text = out.getvalue()
    assert "\r" in text and "10/50" in text and "loss=2.5" in text and "a message" in text
    assert not re.search(r"ETA \d", text)  # tqdm's own format, not the plain lines


def test_stderr_isatty_is_what_decides(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = Progress(3, "step")
    assert bar._bar is not None
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = Progress(3, "step")
    assert bar._bar is None
    bar.update(3)
    bar.close()
    assert "step 3/3 (100%)" in capsys.readouterr().err


def test_duration_and_bad_interval():
    assert [duration(x) for x in (0, 7.3, 250, 3725.2, -1, float("inf"))] == [
        "0s", "7s", "4m10s", "1h02m05s", "?", "?"]
    with pytest.raises(ValueError, match="interval"):
        Progress(1, interval=0)
