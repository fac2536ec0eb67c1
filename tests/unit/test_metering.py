"""Metering's buffer against a real SQLite database that is slow or down: every call is written
once, and the calls dropped when the buffer is full are the oldest ones and are counted."""
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from indai.platform import db
from indai.serving.metering import CallRecord, Meter


class Database:
    """The platform database, with its INSERTs into `calls` held back or failing on request."""

    def __init__(self, path):
        self.eng = db.engine(f"sqlite:///{path / 'platform.db'}")
        db.upgrade(self.eng)
        self.down = False
        self.hold = threading.Event()
        self.hold.set()
        self.writing = threading.Event()
        event.listen(self.eng, "before_cursor_execute", self._before)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO CALLS"):
            if self.down:
                raise OperationalError(statement, parameters, Exception("database is down"))
            self.writing.set()
            self.hold.wait(10)

    def ids(self) -> list[str]:
        with self.eng.connect() as conn:
            return sorted(conn.execute(select(db.Call.request_id)).scalars(), key=lambda r: int(r[1:]))


def call(i: int) -> CallRecord:
    return CallRecord(request_id=f"c{i}", member_id="m", model="cwru", model_version=1, process="p",
                      at=datetime.now(timezone.utc), status=200, latency_ms=1.0, instances=1)


@pytest.fixture
def database(tmp_path):
    return Database(tmp_path)


def test_calls_recorded_during_a_slow_write_are_all_written_once(database):
    """Before: the flush copied a chunk, wrote it, then removed as many calls from the front; calls
    recorded meanwhile into a full buffer pushed the oldest out, so the flush removed new calls
    that were never written (11-15 lost) and the dropped count named calls that were written."""
    meter = Meter(database.eng, batch=10, max_buffer=10)
    for i in range(1, 11):
        meter.record(call(i))
    database.hold.clear()
    flusher = threading.Thread(target=meter.flush)
    flusher.start()
    assert database.writing.wait(10)
    for i in range(11, 16):
        meter.record(call(i))
    assert meter.pending("c1") is not None  # in a write under way: not in the database yet
    database.hold.set()
    flusher.join(10)
    meter.flush()
    assert database.ids() == [f"c{i}" for i in range(1, 16)]
    assert meter.stats() == {"buffered": 0, "written": 15, "dropped": 0, "failures": 0, "last_error": ""}
    assert meter.pending("c1") is None and meter.pending("c15") is None


def test_a_full_buffer_drops_and_counts_the_oldest_calls_while_the_database_is_down(database):
    meter = Meter(database.eng, batch=4, max_buffer=10)
    for i in range(1, 9):
        meter.record(call(i))
    database.down = True
    assert meter.flush() == 0
    for i in range(9, 14):  # 13 calls for 10 places: c1-c3 go
        meter.record(call(i))
    stats = meter.stats()
    assert (stats["buffered"], stats["dropped"], stats["failures"]) == (10, 3, 1)
    assert "database is down" in stats["last_error"]
    assert meter.pending("c3") is None and meter.pending("c4").request_id == "c4"
    database.down = False
    assert meter.flush() == 10
    assert database.ids() == [f"c{i}" for i in range(4, 14)]
    assert meter.stats()["written"] == 10 and meter.stats()["buffered"] == 0
