"""Session queue bookkeeping in-process (the end-to-end proof is tests/test_queue_limits.py)."""

from __future__ import annotations

from roost.broker.message import Message
from roost.broker.session import DROP_OLDEST, OVER, REFUSED, Session
from roost.broker.stats import Stats


def _msg(n: int, qos: int = 1) -> Message:
    return Message("t", b"x" * n, qos, False, None, "pub", 0.0)


def test_limits_refuse_force_and_room_waiters() -> None:
    s = Session("c", Stats(), max_queue=3, max_queue_bytes=0)
    assert [s.deliver(_msg(1), 1, False) for _ in range(3)] == [0, 0, 0]
    assert s.deliver(_msg(1), 1, False) == REFUSED
    assert s.deliver(_msg(1), 1, False, force=True) == OVER
    assert len(s.queue) == 4 and s.queued_bytes == 4 * 2
    fired: list[int] = []
    s.when_room(lambda: fired.append(1))
    assert not fired
    for _ in range(2):  # two leave the queue, with the bookkeeping drain does
        s._unqueued(s.queue.popleft())
    s.drain()  # offline: only checks for room
    assert fired == [1]
    assert s.stats.dropped_queue_refused == 1


def test_byte_limit_qos0_first_and_drop_oldest() -> None:
    s = Session("c", Stats(), max_queue=100, max_queue_bytes=30, full_policy=DROP_OLDEST)
    s.deliver(_msg(9, 0), 0, False)  # 10 bytes with the topic
    s.deliver(_msg(9), 1, False)
    s.deliver(_msg(9), 1, False)
    assert s.queued_bytes == 30
    assert s.deliver(_msg(9), 1, False) == 0  # the QoS 0 one made room
    assert s.stats.dropped_queue_full_qos0 == 1 and s.queued_qos0 == 0
    assert s.deliver(_msg(9), 1, False) == 0  # drop_oldest: the oldest QoS 1 went
    assert s.stats.dropped_queue_full == 1 and s.queued_bytes == 30
    s.clear()
    assert s.queued_bytes == 0 and not s.queue
