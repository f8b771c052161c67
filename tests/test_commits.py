"""A reply gated on several commit sources waits for the slowest of them, for what each held
when the reply was gated, and not for what they took afterwards."""

from __future__ import annotations

from roost.broker.commits import Commits, Progress


def test_a_gated_reply_waits_for_each_source_as_it_was_not_for_later_work() -> None:
    local, remote = Progress(), Progress()
    commits = Commits()
    commits.add(local)
    commits.add(remote)
    mark = commits.mark()
    local.submit()
    remote.submit()
    released: list[str] = []
    commits.wait(commits.moved(mark), lambda: released.append("first"))
    remote.submit()  # the next reply's work, submitted while the first one waits
    local.submit()
    commits.wait([local, remote], lambda: released.append("second"))
    remote.done(1)
    assert released == []  # the local commit is still to come
    local.done(1)
    assert released == ["first"], "released without waiting for the remote's later work"
    local.done(2)
    assert released == ["first"]
    remote.done(2)
    assert released == ["first", "second"]
