"""The bench's stack sampler (bench.stacks) on a plain thread."""

import threading
import time

from bench.stacks import StackSampler


def _admit(seconds: float) -> None:
    time.sleep(seconds)


def _busy(seconds: float) -> None:
    time.sleep(seconds)


def test_samples_are_charged_to_the_phase_on_the_stack():
    started = threading.Event()

    def work() -> None:
        started.wait()
        _admit(0.15)
        _busy(0.1)

    worker = threading.Thread(target=work)
    worker.start()
    with StackSampler(worker.ident, interval_s=0.005) as sampler:
        started.set()
        worker.join()
    rows = {(r["phase"], r["where"]): r["ms"] for r in sampler.top()}
    assert rows[("admitting", "(all)")] >= 75  # of 150: a late sample charges the phase after
    assert rows[("other", "(all)")] >= 25
    assert any(phase == "admitting" and "_admit" in where for phase, where in rows)
