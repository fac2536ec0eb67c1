"""The platform database: members, users, API tokens (and, later, jobs, quotas, audit, KPIs).

SQLAlchemy over SQLite on the embedded default (`$INDAI_HOME/platform.db`) and PostgreSQL on
a cluster (`INDAI_DB_URL=postgresql+psycopg://...`); only the URL differs. The schema is owned
by Alembic migrations in `platform/migrations/`, applied by `upgrade()` before use.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path

from sqlalchemy import (BigInteger, Boolean, Date, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from indai.platform.errors import UserError
from indai.platform.settings import home

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Member(Base):
    """A consortium member: one company."""

    __tablename__ = "members"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    company: Mapped[str] = mapped_column(String(200))
    industry: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(32))  # demand company, AI supplier, research institute
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    member_id: Mapped[str] = mapped_column(ForeignKey("members.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # admin, researcher, consumer
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    """An API token: only its id and a salted hash of its secret are stored (tenancy._hash)."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[str] = mapped_column(Text)  # space-separated
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """A job submitted through the gateway: whose it is (Ray's own record holds the rest)."""

    __tablename__ = "jobs"
    submission_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[str] = mapped_column(String(200))
    gpus: Mapped[float] = mapped_column(Float)
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SubmissionKey(Base):
    """A client's idempotency key for one logical submission, per member: reserved together
    with the job's row before Ray is asked, so a retry finds the job the first try created."""

    __tablename__ = "submission_keys"
    __table_args__ = (UniqueConstraint("member_id", "key", name="uq_submission_keys_member_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(128))
    submission_id: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # pending | submitted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Audit(Base):
    """Who did what, when, with which result."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    member_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text)


def database_url() -> str:
    """INDAI_DB_URL, else the embedded default's SQLite file under INDAI_HOME. Inside a Kubernetes
    pod there is no embedded default: a pod-local SQLite file would hold no members, tokens or
    access rules (every member's call refused, metering lost), so a missing INDAI_DB_URL is an error."""
    url = os.environ.get("INDAI_DB_URL")
    if url:
        return url
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise UserError("INDAI_DB_URL is not set in this pod: on Kubernetes the platform database is the release's "
                        "PostgreSQL, and a pod-local SQLite file would hold no members or tokens. The chart sets it in "
                        "the gateway and in the serving cluster's pods (serve.enabled), never in the jobs' RayCluster, "
                        "where researchers' code runs; elsewhere set INDAI_DB_URL yourself")
    return f"sqlite:///{home() / 'platform.db'}"


CONNECT_TIMEOUT_S = 10
QUERY_TIMEOUT_S = 30.0  # INDAI_DB_QUERY_TIMEOUT_S


def default_query_timeout_s() -> float:
    """INDAI_DB_QUERY_TIMEOUT_S (seconds, 1-3600), else QUERY_TIMEOUT_S."""
    raw = os.environ.get("INDAI_DB_QUERY_TIMEOUT_S", "").strip()
    if not raw:
        return QUERY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 3600:
        raise UserError(f"INDAI_DB_QUERY_TIMEOUT_S={raw[:20]!r} is not a number of seconds from 1 to 3600: it bounds each "
                        f"database operation (default {QUERY_TIMEOUT_S:g}); unset it or give such a number")
    return value


@functools.cache
def _bounded_connection_class():
    """psycopg's Connection with a deadline on every operation it waits for (a statement, its
    results, a commit, a rollback, the pool's ping): all of them go through `Connection.wait`.

    libpq has no client-side query timeout, and a server that stops answering in the middle of a
    statement (a frozen process, a disk that hangs, a VM paused) still has its kernel acknowledge
    every packet, so neither TCP keepalives nor `tcp_user_timeout` end the wait: the caller (a
    gateway worker thread, a member's first call) would wait until the server came back, and
    once every thread waited, everything did. Past the deadline the connection is closed (the
    protocol state is unknown) and the operation fails with OperationalError; SQLAlchemy sees a
    closed connection and drops it from the pool, so the next checkout opens a new one.
    `deadline_s = None` waits without a limit (schema migrations, `unbounded`)."""
    import psycopg
    from psycopg import errors as pg_errors

    class BoundedConnection(psycopg.Connection):
        deadline_s: float | None = QUERY_TIMEOUT_S

        def wait(self, gen, interval=0.1, timeout=None):
            limit = self.deadline_s
            if limit is None or (timeout is not None and timeout <= limit):
                return super().wait(gen, interval, timeout)
            try:
                return super().wait(gen, interval, limit)
            except pg_errors._WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"the database server did not answer within {limit:g} s; this connection was closed") from None

    return BoundedConnection


def engine(url: str | None = None, query_timeout_s: float | None = None) -> Engine:
    """The platform database's engine. On PostgreSQL each connection attempt gives up after
    CONNECT_TIMEOUT_S or the operation deadline, whichever is shorter, and with psycopg (`postgresql+psycopg://`, the one driver installed) each
    operation on a connection after `query_timeout_s` (default INDAI_DB_QUERY_TIMEOUT_S or
    QUERY_TIMEOUT_S; `_bounded_connection_class` says why)."""
    url = url or database_url()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return create_engine(url, pool_pre_ping=True)
    if not url.startswith("postgresql"):
        raise UserError(f"database URL {url.split(':', 1)[0]}:... is not supported: use sqlite:///path or postgresql+psycopg://...")
    # a database host that takes the connection and never answers (a partition, a hung server)
    # would hold each caller for the kernel's minutes; libpq gives up after connect_timeout, which
    # is no longer than one operation's deadline (whole seconds, at least 2: libpq's own floor)
    limit = query_timeout_s if query_timeout_s is not None else default_query_timeout_s()
    connect_s = max(2, min(CONNECT_TIMEOUT_S, int(limit)))
    eng = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": connect_s})
    if eng.dialect.driver == "psycopg":
        bounded = _bounded_connection_class()

        @event.listens_for(eng, "do_connect")
        def _connect(dialect, conn_rec, cargs, cparams):
            conn = bounded.connect(*cargs, **cparams)
            conn.deadline_s = limit
            return conn
    return eng


@contextmanager
def unbounded(conn):
    """Lift the per-operation deadline of `conn` (a SQLAlchemy Connection) for a block whose
    statements may rightly run long (a schema migration), and put it back after."""
    raw = conn.connection.dbapi_connection
    saved = getattr(raw, "deadline_s", None)
    if saved is not None:
        raw.deadline_s = None
    try:
        yield conn
    finally:
        if saved is not None:
            raw.deadline_s = saved


def unavailable(e: Exception):
    """A database call that failed (SQLAlchemyError) as recent.SourceAway: the caller's text, and
    the driver's first line for the service's log (psycopg's names the host, never the password)."""
    from indai.platform.recent import SourceAway

    said = str(getattr(e, "orig", None) or e).splitlines()[0][:200]
    return SourceAway("the platform database is unavailable: retry later", f"the platform database: {said}")


def upgrade(eng: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with eng.begin() as conn, unbounded(conn):
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class ModelAccess(Base):
    """Who may call a registered model: its owner always; `shared` adds the named members;
    `consortium` opens it to every member. The process it serves feeds the KPI report."""

    __tablename__ = "model_access"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_member_id: Mapped[str] = mapped_column(String(64), index=True)
    visibility: Mapped[str] = mapped_column(String(16))
    shared_with: Mapped[str] = mapped_column(Text, default="")
    process: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def shared_members(self) -> list[str]:
        """The members `shared_with` names (stored comma-separated)."""
        return [m for m in self.shared_with.split(",") if m]


class ModelVersion(Base):
    """A registered version the platform promoted, with the sha256 of its files as they were then
    (platform/promotion.py): serving loads it only while its files still hash to this."""

    __tablename__ = "model_versions"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelAlias(Base):
    """Where a promoted alias points: serving resolves `name@alias` here, never from the registry's
    aliases, which every job's MLflow account may move."""

    __tablename__ = "model_aliases"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    set_by: Mapped[str] = mapped_column(String(64))
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Call(Base):
    """One metered inference request (written in batches by the serving ingress)."""

    __tablename__ = "calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    process: Mapped[str] = mapped_column(String(64), default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    status: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    instances: Mapped[int] = mapped_column(Integer, default=1)


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    rating: Mapped[int] = mapped_column(Integer)
    true_label: Mapped[str | None] = mapped_column(String(128), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OperatingHours(Base):
    """Hours a member's process ran on a day (declared by the member)."""

    __tablename__ = "operating_hours"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    process: Mapped[str] = mapped_column(String(64))
    day: Mapped[date] = mapped_column(Date)
    hours: Mapped[float] = mapped_column(Float)


class Outcome(Base):
    """An outcome indicator a member records for a process, before or after the AI."""

    __tablename__ = "outcomes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    process: Mapped[str] = mapped_column(String(64))
    indicator: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(8))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(32), default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
