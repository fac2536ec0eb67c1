"""Members, users and API tokens.

A token looks like `indai_<id>_<secret>`. Only the id and a salted SHA-256 HMAC of the secret
are stored; the secret is shown once, at creation. The secret is 256 random bits, so a fast
hash is as safe as a slow one against guessing, and it keeps a wrong secret cheap to refuse:
with scrypt (16 MiB, ~0.1 s each) anyone who knew a token's id could keep the CPUs of the
gateway and the serving ingress busy without a valid token. Tokens made before that carry a
scrypt hash; the first verification that succeeds rewrites it. Verification looks the id up, recomputes
the hash and compares in constant time; a revoked, expired or disabled token (or one whose
user or member is disabled) is refused at once, since nothing is cached.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from indai.platform.db import Member, Token, User, utcnow
from indai.platform.errors import UserError
from indai.platform.settings import MEMBER_ID_RE

INDUSTRIES = ("steel", "automotive", "shipbuilding", "electronics", "chemicals", "bio", "other")
MEMBER_ROLES = ("demand", "supplier", "research")  # demand company, AI supplier, research institute
USER_ROLES = ("admin", "researcher", "consumer")
SCOPES = ("jobs:submit", "jobs:read", "models:predict", "models:promote", "feedback:write", "admin")
DEFAULT_SCOPES = {"admin": SCOPES, "researcher": ("jobs:submit", "jobs:read", "models:predict", "models:promote", "feedback:write"),
                  "consumer": ("models:predict", "feedback:write")}
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
TOKEN_RE = re.compile(r"^indai_([a-z0-9]{16})_([A-Za-z0-9_-]{32,64})$")
LEGACY_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # tokens made before the HMAC
HMAC_PREFIX = "hmac-sha256$"


class AuthError(UserError):
    """The token is missing, malformed, unknown, revoked, expired or lacks a scope."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: the result of a verified token."""

    user: str
    member: str
    role: str
    scopes: frozenset[str]
    token_id: str

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise AuthError(f"token {self.token_id} lacks scope {scope!r}")


def check_id(kind: str, value: str) -> str:
    """A member id (settings.MEMBER_ID_RE: no dots) or a user id (dots allowed, never two in a row)."""
    if kind == "member":
        if not isinstance(value, str) or not MEMBER_ID_RE.fullmatch(value):
            raise UserError(f"member id {value!r} is not valid: 2-64 lower-case letters, digits, '_' or '-'")
        return value
    if not isinstance(value, str) or not ID_RE.fullmatch(value) or ".." in value:  # fullmatch: "$" alone lets "x\n" through
        raise UserError(f"{kind} id {value!r} is not valid: 2-64 lower-case letters, digits, '.', '_' or '-'")
    return value


def _choice(kind: str, value: str, allowed) -> str:
    if value not in allowed:
        raise UserError(f"{kind} {value!r} is not one of {', '.join(allowed)}")
    return value


def _hash(secret: str, salt: str) -> str:
    return HMAC_PREFIX + hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def _matches(secret: str, t: Token) -> bool:
    """Constant-time comparison with the stored hash, whichever kind it is."""
    if t.hash.startswith(HMAC_PREFIX):
        return hmac.compare_digest(_hash(secret, t.salt), t.hash)
    return hmac.compare_digest(hashlib.scrypt(secret.encode(), salt=bytes.fromhex(t.salt), **LEGACY_SCRYPT).hex(), t.hash)


def _upgrade_hash(eng: Engine, t: Token, secret: str) -> None:
    """Rewrite a legacy scrypt hash as the HMAC once the secret is known to be right."""
    from sqlalchemy.exc import SQLAlchemyError

    if t.hash.startswith(HMAC_PREFIX):
        return
    try:
        with Session(eng) as s, s.begin():
            row = s.get(Token, t.id)
            if row is not None and row.hash == t.hash:
                row.hash = _hash(secret, row.salt)
    except SQLAlchemyError:
        pass  # the token is verified; the next success tries the rewrite again


def add_member(eng: Engine, member_id: str, company: str, industry: str, role: str) -> None:
    check_id("member", member_id)
    _choice("industry", industry, INDUSTRIES)
    _choice("member role", role, MEMBER_ROLES)
    if not company.strip() or len(company) > 200:
        raise UserError("company name must be 1-200 characters")
    with Session(eng) as s, s.begin():
        if s.get(Member, member_id):
            raise UserError(f"member {member_id!r} already exists")
        s.add(Member(id=member_id, company=company.strip(), industry=industry, role=role, created_at=utcnow()))


def list_members(eng: Engine) -> list[dict]:
    with Session(eng) as s:
        return [{"id": m.id, "company": m.company, "industry": m.industry, "role": m.role, "disabled": m.disabled}
                for m in s.scalars(select(Member).order_by(Member.id))]


def set_member_disabled(eng: Engine, member_id: str, disabled: bool = True) -> None:
    with Session(eng) as s, s.begin():
        m = s.get(Member, check_id("member", member_id))
        if m is None:
            raise UserError(f"member {member_id!r} does not exist: `indai member ls` lists them")
        m.disabled = disabled


def add_user(eng: Engine, user_id: str, member_id: str, role: str) -> None:
    check_id("user", user_id)
    _choice("user role", role, USER_ROLES)
    with Session(eng) as s, s.begin():
        if s.get(Member, check_id("member", member_id)) is None:
            raise UserError(f"member {member_id!r} does not exist: add it with `indai member add`")
        if s.get(User, user_id):
            raise UserError(f"user {user_id!r} already exists")
        s.add(User(id=user_id, member_id=member_id, role=role, created_at=utcnow()))


def create_token(eng: Engine, user_id: str, name: str = "default", days: int = 90,
                 scopes: list[str] | None = None) -> tuple[str, str]:
    """Return (token id, the full token). The full token is never stored and never shown again."""
    if not 1 <= days <= 365:
        raise UserError("token lifetime must be 1-365 days")
    with Session(eng) as s, s.begin():
        user = s.get(User, check_id("user", user_id))
        if user is None:
            raise UserError(f"user {user_id!r} does not exist: add it with `indai member user-add`")
        allowed = DEFAULT_SCOPES[user.role]
        wanted = list(scopes) if scopes else list(allowed)
        beyond = [sc for sc in wanted if sc not in allowed]
        if beyond:
            raise UserError(f"a {user.role} cannot hold scope(s) {beyond}; allowed: {', '.join(allowed)}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        s.add(Token(id=token_id, user_id=user_id, name=name[:100], scopes=" ".join(wanted), salt=salt,
                    hash=_hash(secret, salt), created_at=utcnow(), expires_at=utcnow() + timedelta(days=days)))
    return token_id, f"indai_{token_id}_{secret}"


def revoke_token(eng: Engine, token_id: str) -> None:
    with Session(eng) as s, s.begin():
        t = s.get(Token, token_id)
        if t is None:
            raise UserError(f"token {token_id!r} does not exist: `indai token ls` lists them")
        t.revoked_at = t.revoked_at or utcnow()


def list_tokens(eng: Engine, member_id: str | None = None) -> list[dict]:
    with Session(eng) as s:
        q = select(Token, User).join(User, Token.user_id == User.id).order_by(Token.created_at)
        if member_id:
            q = q.where(User.member_id == member_id)
        return [{"id": t.id, "user": u.id, "member": u.member_id, "name": t.name, "scopes": t.scopes.split(),
                 "expires_at": t.expires_at.isoformat(), "revoked": t.revoked_at is not None} for t, u in s.execute(q)]


def aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def verify(eng: Engine, token: str | None) -> Principal:
    """The principal a bearer token stands for, or AuthError (one message for every unknown token)."""
    m = TOKEN_RE.fullmatch(token or "")
    if not m:
        raise AuthError("missing or malformed token: send `Authorization: Bearer indai_<id>_<secret>`")
    token_id, secret = m.groups()
    row = _token_row(eng, token_id)
    if row is None or not _matches(secret, row[0]):
        raise AuthError("unknown token")
    principal = _principal_of(row)
    _upgrade_hash(eng, row[0], secret)
    return principal


def _token_row(eng: Engine, token_id: str):
    with Session(eng) as s:
        return s.execute(select(Token, User, Member).join(User, Token.user_id == User.id)
                         .join(Member, User.member_id == Member.id).where(Token.id == token_id)).first()


def _principal_of(row) -> Principal:
    """The principal of a token row whose secret matched: refused if revoked, expired or disabled."""
    t, u, mem = row
    if t.revoked_at is not None:
        raise AuthError(f"token {t.id} was revoked")
    if aware(t.expires_at) <= utcnow():
        raise AuthError(f"token {t.id} expired on {aware(t.expires_at):%Y-%m-%d}")
    if u.disabled or mem.disabled:
        raise AuthError(f"{'member ' + mem.id if mem.disabled else 'user ' + u.id} is disabled")
    return Principal(user=u.id, member=mem.id, role=u.role, scopes=frozenset(t.scopes.split()), token_id=t.id)


class TokenCache:
    """Token verification for hot paths (the serving ingress): the hash is checked once per
    token, and the cheap status check (revoked, expired, disabled) is repeated at most
    every `recheck_s` seconds, so a revocation takes effect within that time. While the
    database is unreachable a token verified less than `grace_s` ago keeps working, so the
    shop floor is not cut off by a database restart, and its re-checks run in the background
    (`platform/recent.py`: so the first call after the database is back may still be answered
    from the cache, while its re-check runs); an unknown token then gets DatabaseDown."""

    def __init__(self, eng: Engine, recheck_s: float = 2.0, grace_s: float = 300.0, size: int = 10_000,
                 log=lambda line: None):
        from indai.platform.recent import Recent

        self.eng = eng
        self._recent = Recent(lambda _key, p: self._checked(lambda: _status(eng, p)), recheck_s, grace_s, size, log=log)

    @staticmethod
    def _checked(check) -> Principal:
        from sqlalchemy.exc import SQLAlchemyError

        from indai.platform.db import unavailable

        try:
            return check()
        except SQLAlchemyError as e:
            raise unavailable(e) from None

    def stats(self) -> dict:
        return self._recent.stats()

    def verify(self, token: str | None) -> Principal:
        from indai.platform.recent import SourceAway

        key = hashlib.sha256((token or "").encode()).hexdigest()
        try:
            return self._recent.get(key, first=lambda: self._checked(lambda: verify(self.eng, token)))
        except SourceAway as e:
            raise DatabaseDown(str(e)) from None


class DatabaseDown(Exception):
    pass


def _status(eng: Engine, p: Principal) -> Principal:
    """Re-check a token already verified by hash: still valid, user and member enabled."""
    row = _token_row(eng, p.token_id)
    if row is None:
        raise AuthError("unknown token")
    return _principal_of(row)


VISIBILITIES = ("private", "shared", "consortium")


PROCESS_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_process(process) -> str:
    """A member's process name: the one rule for model access rules, operating hours and outcomes,
    so hours declared for a process always meet the calls made for it (calls carry the process of
    the model's access rule)."""
    if not isinstance(process, str) or not PROCESS_RE.fullmatch(process):
        raise UserError(f"process {process!r} is not valid: 1-64 lower-case letters, digits, '-' and '_', starting "
                        "with a letter or digit (e.g. hot-rolling), as in the model's access rule (`indai model share --process`)")
    return process


def set_model_access(eng: Engine, model: str, owner: str, visibility: str = "private", shared_with: list[str] | None = None,
                     process: str = "") -> None:
    """Who may call a registered model (see serving's ingress): its owner always, the named
    members when shared, every member when consortium-wide."""
    from indai.platform.db import ModelAccess
    from indai.platform.registry import check_model_name

    check_model_name(model)
    _choice("visibility", visibility, VISIBILITIES)
    shared = sorted(set(shared_with or []))
    if visibility == "shared" and not shared:
        raise UserError("a shared model needs the members it is shared with: --with member-a,member-b")
    if process:
        check_process(process)
    with Session(eng) as s, s.begin():
        known = set(s.scalars(select(Member.id)))
        missing = [m for m in [owner, *shared] if m not in known]
        if missing:
            raise UserError(f"member(s) {missing} do not exist: `indai member ls` lists them")
        row = s.get(ModelAccess, model)
        if row is None:
            row = ModelAccess(model=model)
            s.add(row)
        row.owner_member_id, row.visibility, row.shared_with = owner, visibility, ",".join(shared)
        row.process, row.updated_at = process, utcnow()
