"""The soak in its short CI form: 1,000 tasks, two CPU workers, 1% malformed, one worker
killed and restarted midway. The full form is ``python tests/soak.py --tasks 10000``; its last
result is in docs/soak.md."""

from __future__ import annotations

import pytest
import soak

pytestmark = pytest.mark.integration


def test_soak_accounts_for_every_task():
    result = soak.run(1000)
    assert result.lost == 0
    assert result.failed_otherwise == 0
    assert result.written_twice == 0
    assert result.succeeded + result.failed_as_expected == result.tasks
    assert result.malformed == result.failed_as_expected > 0
    assert result.ok
