"""Progress bars write a line every 30 s, not ten a second, when stderr is a log file."""

from __future__ import annotations

import io
import sys
import time

from trainer.progress import LOG_INTERVAL_S, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_writes_its_start_and_end_only_in_a_short_run(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress(range(100), desc="harvest"):
        time.sleep(0.01)  # a second in all: tqdm's default would write ten updates
    assert log.getvalue().count("\r") <= 3 and "100/100" in log.getvalue()


def test_on_a_terminal_the_bar_keeps_tqdms_pace(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress(total=10) as bar:
        assert bar.mininterval < LOG_INTERVAL_S
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress(total=10) as bar:
        assert bar.mininterval == LOG_INTERVAL_S
