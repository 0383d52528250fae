"""The garbage collector's freeze and clock (worker.collector)."""

import gc

import pytest

from worker.collector import CLOCK, freeze_resident


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()


def test_freeze_resident_hides_what_exists_from_full_collections(thawed):
    resident = [[] for _ in range(1000)]
    freeze_resident()
    assert gc.get_freeze_count() >= len(resident)
    later = [[]]
    assert gc.is_tracked(later)
    gc.collect()  # still collects what came after
    assert gc.get_freeze_count() >= len(resident)


def test_clock_times_every_collection():
    clock = CLOCK
    total, count = clock.total_ms, clock.collections
    gc.collect()
    gc.collect(0)
    assert clock.collections >= count + 2
    assert clock.total_ms > total
    assert clock.longest_ms > 0
