from worker.policy import BatchDecision, decide_batch


def decide(pending, oldest, now, max_batch_size=4, max_wait_s=0.05):
    return decide_batch(pending, oldest, now, max_batch_size=max_batch_size, max_wait_s=max_wait_s)


def test_empty_buffer_waits_for_arrivals():
    assert decide(0, None, 10.0) == BatchDecision(take=0, wait_s=None)


def test_full_batch_is_cut_at_once():
    assert decide(4, 10.0, 10.0) == BatchDecision(take=4, wait_s=0.0)


def test_more_than_a_batch_takes_only_a_batch():
    assert decide(9, 10.0, 10.0).take == 4


def test_partial_batch_waits_for_the_rest_of_the_oldest_wait():
    decision = decide(2, 10.0, 10.02)
    assert decision.take == 0
    assert abs(decision.wait_s - 0.03) < 1e-9


def test_partial_batch_is_cut_when_the_oldest_has_waited_long_enough():
    assert decide(2, 10.0, 10.05) == BatchDecision(take=2, wait_s=0.0)
    assert decide(3, 10.0, 99.0) == BatchDecision(take=3, wait_s=0.0)


def test_zero_wait_cuts_whatever_is_there():
    assert decide(1, 10.0, 10.0, max_wait_s=0.0) == BatchDecision(take=1, wait_s=0.0)


def test_batch_size_one_never_waits():
    assert decide(1, 10.0, 10.0, max_batch_size=1) == BatchDecision(take=1, wait_s=0.0)
