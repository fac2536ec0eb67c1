"""platform/recent.py: what the ingress answers from its recent lookups, and while their source is away.

A hand-moved clock and a lookup whose source can be switched off or held: fresh answers are
reused, a change is seen by the first call after `fresh_s`, an outage is met by one call and then
only by the background, answers stand in for `grace_s` and no longer, and a refusal from the
source (no such alias) drops what was kept."""
import threading

import pytest
from waiting import wait

from indai.platform.recent import Recent, SourceAway


class Source:
    """A lookup's source: `values[key]`, a KeyError for a missing key; away while `up` is False;
    each call can be held at `gate`. Counts its calls and the threads that made them."""

    def __init__(self, values: dict):
        self.values, self.up, self.calls, self.threads, self.kept = dict(values), True, [], [], []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key, kept=None):
        self.calls.append(key)
        self.kept.append(kept)
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(30)
        if not self.up:
            raise SourceAway("the source did not answer")
        return self.values[key]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def parts():
    source, clock, said = Source({"a@champion": 1, "b@champion": 7}), Clock(), []
    return source, clock, said, Recent(source, fresh_s=2, grace_s=300, clock=clock, log=said.append)


def test_answers_are_reused_while_fresh_and_a_change_is_seen_by_the_first_call_after(parts):
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1 and source.calls == ["a@champion"]
    source.values["a@champion"] = 2  # the alias moved
    clock.t += 1.9
    assert recent.get("a@champion") == 1 and len(source.calls) == 1
    clock.t += 0.2
    assert recent.get("a@champion") == 2 and len(source.calls) == 2
    assert source.threads[-1] == threading.current_thread().name  # the call itself looked it up
    assert source.kept == [None, 1]  # a re-check is handed the answer kept (a token's re-check reads its principal)
    assert recent.stats() == {"away": False, "stale_answers": 0, "failed_lookups": 0, "kept": 1} and said == []


def test_an_outage_is_met_by_one_call_then_answers_stand_in_and_the_background_finds_the_source_back(parts):
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1 and recent.get("b@champion") == 7
    source.up = False
    clock.t += 5
    # the first call past fresh_s meets the outage, and gets the answer kept
    assert recent.get("a@champion") == 1
    assert len(source.calls) == 3 and recent.stats()["away"] and recent.stats()["failed_lookups"] == 1
    assert said == ["the source did not answer; answers confirmed in the last 300 s stand in meanwhile, and are looked up "
                    "again in the background"]
    # while away, calls do not wait on the source: the lookups run in the background, one per key at a time
    source.gate.clear()
    for _ in range(50):
        assert recent.get("a@champion") == 1 and recent.get("b@champion") == 7
    wait("both keys' background lookups", lambda: len(source.calls) == 5, timeout=10, interval=0.01)
    assert sorted(source.calls[3:]) == ["a@champion", "b@champion"]
    assert all(t.startswith("indai-lookup") for t in source.threads[3:])
    source.gate.set()
    wait("the background lookups to fail", lambda: recent.stats()["failed_lookups"] == 3, timeout=10, interval=0.01)
    assert recent.stats()["stale_answers"] == 101
    # the source is back: the next background lookup confirms, and fresh answers follow
    clock.t += 4
    source.up, source.values["a@champion"] = True, 3
    assert recent.get("a@champion") == 1  # (still answered from what was kept; its lookup starts)
    wait("the source seen back", lambda: not recent.stats()["away"], timeout=10, interval=0.01)
    assert said[-1] == "the source is back after 4.0 s"
    assert recent.get("a@champion") == 3
    calls = len(source.calls)
    assert recent.get("a@champion") == 3 and len(source.calls) == calls  # fresh again


def test_answers_stand_in_for_grace_s_and_no_longer(parts):
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1
    source.up = False
    clock.t += 299
    assert recent.get("a@champion") == 1
    wait("no lookup under way", lambda: not recent._running, timeout=10, interval=0.01)
    clock.t += 2  # 301 s since it was last confirmed
    with pytest.raises(SourceAway, match="the source did not answer"):
        recent.get("a@champion")
    assert source.threads[-1] == threading.current_thread().name
    # a key never seen has nothing to stand in
    with pytest.raises(SourceAway):
        recent.get("b@champion")
    # nothing failed is kept: back up, the next call looks up and gets the answer
    source.up = True
    assert recent.get("b@champion") == 7 and not recent.stats()["away"]


def test_a_refusal_from_the_source_drops_what_was_kept_and_reaches_the_caller(parts):
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1
    del source.values["a@champion"]  # the alias was deleted
    clock.t += 3
    with pytest.raises(KeyError):
        recent.get("a@champion")
    source.up = False  # away now: nothing kept for the key, so nothing stands in
    with pytest.raises(SourceAway):
        recent.get("a@champion")


def test_a_refusal_found_in_the_background_reaches_the_next_call(parts):
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1
    source.up = False
    clock.t += 3
    assert recent.get("a@champion") == 1  # away
    source.up = True
    del source.values["a@champion"]
    clock.t += 3
    assert recent.get("a@champion") == 1  # answered while its background lookup runs...
    wait("the background lookup", lambda: not recent._running, timeout=10, interval=0.01)
    with pytest.raises(KeyError):  # ...which found it gone: the next call is told
        recent.get("a@champion")


def test_calls_while_a_key_is_looked_up_get_the_kept_answer_at_once(parts):
    """The source is up but slow: the call past fresh_s that looks up waits for it; the others
    get what was kept meanwhile."""
    source, clock, said, recent = parts
    assert recent.get("a@champion") == 1
    source.values["a@champion"] = 2
    clock.t += 3
    source.gate.clear()
    got = []
    slow = threading.Thread(target=lambda: got.append(recent.get("a@champion")))
    slow.start()
    wait("the lookup under way", lambda: len(source.calls) == 2, timeout=10, interval=0.01)
    assert [recent.get("a@champion") for _ in range(20)] == [1] * 20
    assert len(source.calls) == 2 and slow.is_alive()
    source.gate.set()
    slow.join(10)
    assert got == [2] and recent.get("a@champion") == 2 and recent.stats()["stale_answers"] == 20


def test_a_key_with_nothing_kept_is_looked_up_by_the_calls_own_first_lookup(parts):
    """A token's first check needs the token itself, which is never kept: the call names that lookup."""
    source, clock, said, recent = parts
    assert recent.get("c@champion", first=lambda: 11) == 11 and source.calls == []
    source.values["c@champion"] = 13
    clock.t += 3
    assert recent.get("c@champion", first=lambda: pytest.fail("the first lookup used for a key with an answer kept")) == 13
    assert source.calls == ["c@champion"] and source.kept == [11]


def test_the_kept_answers_are_bounded():
    source = Source({k: k for k in range(30)})
    recent = Recent(source, fresh_s=60, grace_s=300, size=10)
    for k in range(30):
        assert recent.get(k) == k
    assert recent.stats()["kept"] <= 10
