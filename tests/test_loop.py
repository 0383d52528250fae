"""The worker's scheduling loop on a fake executor, delivered in process: no Redis, no Celery."""

import math

from producer.errors import ModelError
from worker.executor import Outcome, StepReport
from worker.inprocess import Job, in_process_loop


class FakeExecutor:
    """A batch executor: takes up to ``size`` requests when idle, answers them in one step."""

    def __init__(self, size: int = 4, fail_steps: int = 0) -> None:
        self.size = size
        self.fail_steps = fail_steps
        self.inside: list[str] = []
        self.batches: list[list[str]] = []
        self.resets = 0

    def room(self) -> int:
        return 0 if self.inside else self.size

    def has_work(self) -> bool:
        return bool(self.inside)

    def admit(self, messages):
        self.inside += [task_id for task_id, _ in messages]
        return []

    def step(self) -> StepReport:
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("the device went away")
        batch, self.inside = self.inside, []
        self.batches.append(batch)
        result = {"answer": "ok", "prompt_tokens": 3, "answer_tokens": 2}
        return StepReport([Outcome(t, result=result) for t in batch], rows=len(batch))

    def warmup(self) -> None:
        pass

    def reset(self) -> None:
        self.resets += 1
        self.inside = []


def jobs(n: int, prefix: str = "t") -> list[Job]:
    return [Job(f"{prefix}{i}", {"question": "?"}) for i in range(n)]


def serve(executor, items, *, max_wait_s=0.0, max_attempts=1, prepare=None):
    finished = []
    loop, delivery = in_process_loop(
        executor, max_wait_s=max_wait_s, max_attempts=max_attempts, on_finish=finished.extend
    )
    if prepare is not None:
        prepare(delivery)
    for item in items:
        loop.add(item)
    loop.close()
    loop.run()
    return finished, delivery


def test_every_request_is_answered_in_batches_the_executor_has_room_for():
    executor = FakeExecutor(size=4)
    finished, delivery = serve(executor, jobs(10), max_wait_s=math.inf)
    assert sorted(c.item.id for c in finished) == sorted(j.id for j in jobs(10))
    assert [len(b) for b in executor.batches] == [4, 4, 2]  # full batches, then the rest
    assert all(c.outcome.result["answer"] == "ok" for c in finished)
    assert {c.batch_size for c in finished} == {4, 2}
    assert set(delivery.results) == {j.id for j in jobs(10)}
    assert all(j.started_at is not None for j in (c.item for c in finished))


def test_a_revoked_request_never_reaches_the_executor():
    executor = FakeExecutor()
    finished, _ = serve(executor, jobs(3), prepare=lambda d: d.revoked.add("t1"))
    assert {c.item.id for c in finished} == {"t0", "t2"}
    assert all("t1" not in batch for batch in executor.batches)


def test_a_redelivery_of_a_stored_task_is_finished_without_running():
    executor = FakeExecutor()

    def stored(delivery):
        delivery.results["t0"] = Outcome("t0", result={"answer": "earlier"})

    finished, _ = serve(executor, jobs(2), prepare=stored)
    redelivered = next(c for c in finished if c.item.id == "t0")
    assert redelivered.outcome is None
    assert executor.batches == [["t1"]]


def test_a_task_that_reached_the_model_before_runs_alone():
    executor = FakeExecutor(size=4)
    finished, _ = serve(
        executor, jobs(3), max_attempts=3, prepare=lambda d: d.attempts.update(t1=1)
    )
    assert ["t1"] in executor.batches
    assert len(finished) == 3


def test_a_task_past_its_attempts_fails_as_model_error_without_running():
    executor = FakeExecutor()
    finished, delivery = serve(
        executor, jobs(2), max_attempts=2, prepare=lambda d: d.attempts.update(t0=2)
    )
    failed = delivery.results["t0"]
    assert isinstance(failed.error, ModelError)
    assert "gave up after 2 attempts" in str(failed.error)
    assert executor.batches == [["t1"]]
    assert len(finished) == 2


def test_a_failed_step_requeues_what_was_inside_and_resets_the_executor():
    executor = FakeExecutor(size=2, fail_steps=1)
    finished, delivery = serve(executor, jobs(4), max_wait_s=math.inf)
    assert [j.id for j in delivery.requeued] == ["t0", "t1"]
    assert executor.resets == 1
    assert {c.item.id for c in finished} == {"t2", "t3"}


def test_a_second_delivery_of_a_running_task_is_finished_with_its_outcome():
    executor = FakeExecutor(size=4)
    first, again = Job("t0", {}), Job("t0", {})
    finished, _ = serve(executor, [first, again])
    assert executor.batches == [["t0"]]
    outcomes = {id(c.item): c.outcome for c in finished}
    assert outcomes[id(first)] is not None and outcomes[id(again)] is None


def test_observers_see_what_the_model_did():
    executor = FakeExecutor(size=4)
    seen = []
    loop, _ = in_process_loop(executor, max_wait_s=math.inf, observers=[seen.append])
    for job in jobs(4):
        loop.add(job)
    loop.close()
    loop.run()
    assert sum(s.finished for s in seen) == 4
    assert sum(s.answer_tokens for s in seen) == 8
    assert seen[0].batch_size == 4
