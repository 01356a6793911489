"""edgelm.model.default_spin on Linux: idle cores measured now from /proc/stat (issue 14). No timing here: the
reader and the clock are faked, so each case says exactly what the machine looked like."""
from __future__ import annotations

import itertools

import pytest

from edgelm import model as m


def _stat_line(user: int, idle: int, iowait: int = 0, system: int = 0) -> str:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


@pytest.fixture
def machine(monkeypatch):
    """Fake a 2-core machine whose /proc/stat shows the given idle and busy tick deltas between two reads, and
    a 1-minute load average of 2.0 (what the old rule saw right after a benchmark: "no core idle")."""
    monkeypatch.delenv(m.ENV_SPIN, raising=False)
    monkeypatch.setattr(m.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(m.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(m.time, "sleep", lambda s: None)
    monkeypatch.setattr(m, "_own_cpu_ticks", lambda: 0.0)

    def show(idle_ticks: int, busy_ticks: int) -> None:
        reads = itertools.cycle([(1000, 5000), (1000 + idle_ticks, 5000 + idle_ticks + busy_ticks)])
        monkeypatch.setattr(m, "_read_cpu_times", lambda: next(reads))
    return show


def test_read_cpu_times_parses_proc_stat(tmp_path):
    f = tmp_path / "stat"
    f.write_text(_stat_line(user=100, idle=700, iowait=50, system=30))
    assert m._read_cpu_times(str(f)) == (750, 880)  # idle + iowait, all eight counted fields
    f.write_text("intr 1 2 3\n")
    assert m._read_cpu_times(str(f)) is None
    assert m._read_cpu_times(str(tmp_path / "missing")) is None


def test_quiet_machine_spins_although_the_load_average_is_high(machine):
    machine(idle_ticks=10, busy_ticks=0)  # both cores idle over the sample
    assert m.idle_cores() == pytest.approx(2.0)
    assert m.default_spin(2) is True


def test_one_busy_core_turns_spinning_off(machine):
    machine(idle_ticks=5, busy_ticks=5)  # one core's worth of ticks busy
    assert m.idle_cores() == pytest.approx(1.0)
    assert m.default_spin(2) is False


def test_this_process_own_cpu_time_counts_as_idle(machine, monkeypatch):
    machine(idle_ticks=6, busy_ticks=4)  # 1.2 of 2 cores idle ...
    own = itertools.cycle([100.0, 104.0])  # ... but the 4 busy ticks were this process's own start-up threads
    monkeypatch.setattr(m, "_own_cpu_ticks", lambda: next(own))
    assert m.idle_cores() == pytest.approx(2.0)
    assert m.default_spin(2) is True


def test_margin_tolerates_a_little_background_noise(machine):
    machine(idle_ticks=8, busy_ticks=2)  # 1.6 of 2 cores idle: >= threads - 0.5
    assert m.default_spin(2) is True
    machine(idle_ticks=7, busy_ticks=3)  # 1.4 idle
    assert m.default_spin(2) is False


def test_one_thread_and_overrides(machine, monkeypatch):
    machine(idle_ticks=10, busy_ticks=0)
    assert m.default_spin(1) is False  # no worker threads to spin
    machine(idle_ticks=10, busy_ticks=0)
    monkeypatch.setenv(m.ENV_SPIN, "0")
    assert m.default_spin(2) is False
    machine(idle_ticks=0, busy_ticks=10)
    monkeypatch.setenv(m.ENV_SPIN, "1")
    assert m.default_spin(2) is True


def test_falls_back_to_load_average_without_proc_stat(machine, monkeypatch):
    monkeypatch.setattr(m, "_read_cpu_times", lambda: None)
    assert m.idle_cores() is None
    assert m.default_spin(2) is False  # load 2.0 on 2 cores
    monkeypatch.setattr(m.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert m.default_spin(2) is True


def test_counter_that_did_not_advance_falls_back(machine, monkeypatch):
    machine(idle_ticks=0, busy_ticks=0)  # no tick in the sample window: no information
    monkeypatch.setattr(m.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert m.default_spin(2) is True


def test_performance_doc_quotes_the_committed_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = (root / "benchmarks/results/spin-default.md").read_text(encoding="utf-8").split("\n\n", 1)[1]
    assert table.strip() in (root / "docs/performance.md").read_text(encoding="utf-8"), \
        "docs/performance.md's spin table differs from benchmarks/results/spin-default.md"
