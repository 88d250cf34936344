"""What a compile costs the machine: the CPU other processes take while a bench row compiles."""

import os
import subprocess
import sys
import threading
import time

import pytest

from qcompiler.resources import children_cpu_seconds, machine_busy_seconds, others_cpu_share


def test_busy_seconds_count_user_system_irq_and_steal_but_not_idle():
    tck = os.sysconf("SC_CLK_TCK")
    stat = "cpu  100 10 50 9000 300 5 7 3 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert machine_busy_seconds(stat) == pytest.approx((100 + 10 + 50 + 5 + 7 + 3) / tck)
    assert machine_busy_seconds("garbage") is None


def test_share_is_the_rest_of_the_machine_clipped_to_0_1():
    assert others_cpu_share(busy=3.0, own=1.0, wall=2.0, cores=2) == pytest.approx(0.5)
    assert others_cpu_share(busy=1.0, own=1.2, wall=2.0, cores=2) == 0.0  # tick rounding
    assert others_cpu_share(busy=9.0, own=0.0, wall=1.0, cores=2) == 1.0


@pytest.mark.skipif(machine_busy_seconds() is None, reason="no /proc/stat")
def test_a_busy_neighbour_shows_up_and_the_measured_child_does_not():
    """A child that sleeps 1.5 s while this process spins one core: about half of a 2-core machine
    (more if CI runs other jobs), and the child's own CPU is subtracted."""
    stop = time.monotonic() + 1.5

    def spin():
        while time.monotonic() < stop:
            pass

    busy0, own0, t0 = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
    neighbour = threading.Thread(target=spin)
    neighbour.start()
    subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
    neighbour.join()
    share = others_cpu_share(machine_busy_seconds() - busy0, children_cpu_seconds() - own0, time.monotonic() - t0,
                             os.cpu_count() or 1)
    assert share > 0.6 / (os.cpu_count() or 1), share
