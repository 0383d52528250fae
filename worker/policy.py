"""When to cut a batch: one pure function, no I/O, no clocks of its own."""

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchDecision:
    """What the loop should do now.

    ``take`` requests leave the buffer now (0: none yet); otherwise wait at most
    ``wait_s`` seconds before asking again (``None``: until a request arrives).
    """

    take: int
    wait_s: float | None


def decide_batch(
    pending: int,
    oldest_arrival: float | None,
    now: float,
    *,
    max_batch_size: int,
    max_wait_s: float,
) -> BatchDecision:
    """Cut a batch when it is full or when its oldest request has waited ``max_wait_s``.

    ``pending`` requests are buffered; ``oldest_arrival`` is when the oldest of them
    arrived, on the same clock as ``now``.
    """
    if pending <= 0 or oldest_arrival is None:
        return BatchDecision(take=0, wait_s=None)
    if pending >= max_batch_size:
        return BatchDecision(take=max_batch_size, wait_s=0.0)
    waited = now - oldest_arrival
    if waited >= max_wait_s:
        return BatchDecision(take=pending, wait_s=0.0)
    return BatchDecision(take=0, wait_s=max_wait_s - waited)
