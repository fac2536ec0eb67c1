"""Members, users and tokens on both databases the platform runs on: SQLite (embedded
default) and PostgreSQL (cluster; a real server from Debian's packages)."""
import re
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session
from waiting import wait

from indai.platform import db, tenancy
from indai.platform.errors import UserError
from indai.platform.tenancy import AuthError

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def eng(request, tmp_path):
    if request.param == "sqlite":
        e = db.engine(f"sqlite:///{tmp_path / 'platform.db'}")
    else:
        e = db.engine(request.getfixturevalue("postgres").new_database())  # a fresh database per test
    db.upgrade(e)
    db.upgrade(e)  # migrations are idempotent
    yield e
    e.dispose()


def seed(e):
    tenancy.add_member(e, "steel-a", "Steel A Co.", "steel", "demand")
    tenancy.add_member(e, "auto-b", "Auto B Co.", "automotive", "demand")
    tenancy.add_user(e, "kim", "steel-a", "researcher")
    tenancy.add_user(e, "lee", "auto-b", "consumer")


def test_token_lifecycle(eng):
    seed(eng)
    tid, token = tenancy.create_token(eng, "kim", "laptop")
    p = tenancy.verify(eng, token)
    assert (p.user, p.member, p.role) == ("kim", "steel-a", "researcher") and "jobs:submit" in p.scopes
    # only a hash is stored: the secret appears nowhere in the database
    with Session(eng) as s:
        row = s.execute(text("SELECT * FROM tokens")).one()
    assert token.split("_", 2)[2] not in " ".join(map(str, row)) and re.fullmatch(r"hmac-sha256\$[0-9a-f]{64}", row.hash)
    tenancy.revoke_token(eng, tid)
    with pytest.raises(AuthError, match="revoked"):
        tenancy.verify(eng, token)


@pytest.mark.parametrize("bad", [None, "", "Bearer x", "indai_0123456789abcdef_short", "indai_../../etc_" + "a" * 40])
def test_malformed_tokens_are_refused(eng, bad):
    with pytest.raises(AuthError, match="malformed"):
        tenancy.verify(eng, bad)


def test_wrong_secret_and_unknown_id_look_the_same(eng):
    seed(eng)
    tid, token = tenancy.create_token(eng, "kim")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    other = f"indai_{'0' * 16}_{token.split('_', 2)[2]}"
    for t in (forged, other):
        with pytest.raises(AuthError, match="^unknown token$"):
            tenancy.verify(eng, t)


def test_a_wrong_secret_costs_no_slow_hash_and_legacy_scrypt_tokens_are_rewritten(eng, monkeypatch):
    """A wrong secret for a known token id had cost a scrypt (16 MiB, ~0.1 s) on every request,
    before any rate limit: anyone who saw a token id could keep the gateway's and the ingress's
    CPUs busy. Tokens are stored as an HMAC now; a token made before keeps working and its
    scrypt hash is rewritten at its first successful use."""
    import hashlib

    seed(eng)
    tid, token = tenancy.create_token(eng, "kim")
    with Session(eng) as s:
        assert s.get(db.Token, tid).hash.startswith("hmac-sha256$")
    scrypts = []
    real_scrypt = hashlib.scrypt
    monkeypatch.setattr(hashlib, "scrypt", lambda *a, **k: scrypts.append(1) or real_scrypt(*a, **k))
    for _ in range(20):
        with pytest.raises(AuthError, match="^unknown token$"):
            tenancy.verify(eng, token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    assert tenancy.verify(eng, token).user == "kim" and scrypts == []

    # a token as they were stored before: scrypt of the secret
    old_id, old_token = tenancy.create_token(eng, "kim")
    secret = old_token.split("_", 2)[2]
    with Session(eng) as s, s.begin():
        row = s.get(db.Token, old_id)
        row.hash = real_scrypt(secret.encode(), salt=bytes.fromhex(row.salt), **tenancy.LEGACY_SCRYPT).hex()
    with pytest.raises(AuthError, match="^unknown token$"):
        tenancy.verify(eng, old_token[:-4] + ("AAAA" if not old_token.endswith("AAAA") else "BBBB"))
    with Session(eng) as s:
        assert not s.get(db.Token, old_id).hash.startswith("hmac-sha256$")  # a wrong secret rewrites nothing
    assert tenancy.verify(eng, old_token).token_id == old_id
    with Session(eng) as s:
        assert s.get(db.Token, old_id).hash.startswith("hmac-sha256$")
    before = len(scrypts)
    assert tenancy.verify(eng, old_token).token_id == old_id and len(scrypts) == before  # no scrypt any more


def test_disabling_a_member_refuses_its_tokens_at_once(eng):
    seed(eng)
    _, kim = tenancy.create_token(eng, "kim")
    _, lee = tenancy.create_token(eng, "lee")
    tenancy.set_member_disabled(eng, "steel-a")
    with pytest.raises(AuthError, match="member steel-a is disabled"):
        tenancy.verify(eng, kim)
    assert tenancy.verify(eng, lee).member == "auto-b"


def test_expired_token_is_refused(eng):
    seed(eng)
    tid, token = tenancy.create_token(eng, "kim", days=1)
    with Session(eng) as s, s.begin():
        s.get(db.Token, tid).expires_at = db.utcnow() - timedelta(seconds=1)
    with pytest.raises(AuthError, match="expired"):
        tenancy.verify(eng, token)


def test_roles_bound_scopes_and_bad_input(eng):
    seed(eng)
    with pytest.raises(UserError, match="a consumer cannot hold scope"):
        tenancy.create_token(eng, "lee", scopes=["jobs:submit"])
    p = tenancy.verify(eng, tenancy.create_token(eng, "lee")[1])
    with pytest.raises(AuthError, match="lacks scope 'jobs:submit'"):
        p.require("jobs:submit")
    p.require("models:predict")
    with pytest.raises(UserError, match="already exists"):
        tenancy.add_member(eng, "steel-a", "again", "steel", "demand")
    with pytest.raises(UserError, match="not one of"):
        tenancy.add_member(eng, "x-co", "X", "mining", "demand")
    with pytest.raises(UserError, match="id '../etc' is not valid"):
        tenancy.add_member(eng, "../etc", "X", "steel", "demand")
    with pytest.raises(UserError, match="does not exist"):
        tenancy.add_user(eng, "park", "no-such-member", "researcher")
    listed = tenancy.list_tokens(eng, "auto-b")
    assert [t["user"] for t in listed] == ["lee"] and "hash" not in listed[0] and "salt" not in listed[0]


def test_gateway_answers_503_while_the_database_is_down_and_recovers(postgres):
    """PostgreSQL really stopped under a running gateway: a clear 503, nothing else; once it is
    back the same token works again (connections are re-checked before use)."""
    import requests
    from servers import app_server

    from indai.platform.gateway import build_gateway

    e = db.engine(postgres.new_database("t_down"))
    db.upgrade(e)
    seed(e)
    _, token = tenancy.create_token(e, "kim")
    auth = {"Authorization": f"Bearer {token}"}
    with app_server(build_gateway("http://127.0.0.1:9", e)) as url:
        who = lambda: requests.get(f"{url}/api/indai/whoami", headers=auth, timeout=30)  # noqa: E731
        assert who().json() == {"user": "kim", "member": "steel-a", "role": "researcher"}
        postgres.stop()
        try:
            r = who()
            assert r.status_code == 503 and "database is unavailable" in r.json()["detail"]
            r = requests.post(f"{url}/api/jobs/", json={"entrypoint": "echo"}, headers=auth, timeout=30)
            assert r.status_code == 503
        finally:
            postgres.start()
        assert who().status_code == 200
    e.dispose()


def test_token_cache_rechecks_and_rides_out_a_database_restart(postgres):
    """The serving ingress's verifier: a revocation is seen at the next re-check; while the
    database is down a recently verified token keeps working and an unseen one is refused
    with DatabaseDown (503), not with 'unknown token'; just after the database is back, the
    first call is answered from the cache while its re-check runs."""
    import time

    e = db.engine(postgres.new_database("t_cache"))
    db.upgrade(e)
    seed(e)
    tid, token = tenancy.create_token(e, "kim")
    _, other = tenancy.create_token(e, "lee")
    cache = tenancy.TokenCache(e, recheck_s=0.2, grace_s=60)
    assert cache.verify(token).member == "steel-a"
    postgres.stop()
    try:
        time.sleep(0.3)
        assert cache.verify(token).user == "kim"  # within the grace period
        with pytest.raises(tenancy.DatabaseDown):
            cache.verify(other)
        assert cache.stats()["away"] and cache.stats()["stale_answers"] == 1
    finally:
        postgres.start()
    tenancy.revoke_token(e, tid)
    time.sleep(0.3)
    # the database is back, but nothing has told the cache yet: the first call is answered from it
    # while its re-check runs in the background, and that re-check finds the revocation
    assert cache.verify(token).user == "kim" and cache.stats()["stale_answers"] == 2
    wait("the background re-check", lambda: not cache.stats()["away"], timeout=30, interval=0.05)
    with pytest.raises(AuthError, match="revoked"):
        cache.verify(token)
    # while the database is up, a revocation is seen at the first call after recheck_s
    third_id, third = tenancy.create_token(e, "kim")
    assert cache.verify(third).user == "kim"
    tenancy.revoke_token(e, third_id)
    time.sleep(0.3)
    with pytest.raises(AuthError, match="revoked"):
        cache.verify(third)
    e.dispose()


def test_a_database_that_stops_answering_mid_statement_is_given_up_on(postgres, monkeypatch):
    """libpq has no client-side query timeout, and a frozen server's kernel still acknowledges
    every packet. Each operation on a PostgreSQL connection is bounded (db.engine's
    `query_timeout_s`): a statement past it fails with a clear OperationalError and its connection
    is dropped, the next statement on a live server runs on a new one, and a migration may run
    longer (db.unbounded)."""
    import time

    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(db, "CONNECT_TIMEOUT_S", 3)  # read when the engine is made
    e = db.engine(postgres.new_database("t_slow"), query_timeout_s=1.5)
    db.upgrade(e)
    t0 = time.monotonic()
    with pytest.raises(OperationalError, match=r"did not answer within 1.5 s"):
        with e.connect() as c:
            c.execute(text("SELECT pg_sleep(20)"))
    assert 1.4 < time.monotonic() - t0 < 6
    with e.connect() as c:  # the pool gave up that connection: a new one answers at once
        assert c.execute(text("SELECT 41 + 1")).scalar() == 42
        with db.unbounded(c):  # a migration's statement may take longer than the bound
            c.execute(text("SELECT pg_sleep(2)"))
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="did not answer"):  # and the bound is back after it
            c.execute(text("SELECT pg_sleep(20)"))
        assert time.monotonic() - t0 < 6

    seed(e)
    _, token = tenancy.create_token(e, "kim")
    cache = tenancy.TokenCache(e, recheck_s=0.2, grace_s=60)
    with postgres.frozen():
        t0 = time.monotonic()
        with pytest.raises(OperationalError):  # ping 1.5 s, then a new connection's 3 s
            tenancy.verify(e, token)
        with pytest.raises(tenancy.DatabaseDown):  # the ingress's first check of a token
            cache.verify(token)
        assert time.monotonic() - t0 < 2 * (1.5 + 3) + 4
    assert tenancy.verify(e, token).user == "kim"
    e.dispose()


def test_gateway_answers_503_while_the_database_is_frozen(postgres, monkeypatch):
    """A frozen PostgreSQL under a running gateway: each call gets 503 within the bounds (a
    statement's, then a new connection's), also with more calls in flight than the gateway has
    worker threads, and the gateway answers again at once when the server does."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from servers import app_server

    from indai.platform.gateway import build_gateway

    monkeypatch.setattr(db, "CONNECT_TIMEOUT_S", 2)
    e = db.engine(postgres.new_database("t_frozen"), query_timeout_s=2)
    db.upgrade(e)
    seed(e)
    _, token = tenancy.create_token(e, "kim")
    auth = {"Authorization": f"Bearer {token}"}
    with app_server(build_gateway("http://127.0.0.1:9", e)) as url:
        who = lambda _=None: requests.get(f"{url}/api/indai/whoami", headers=auth, timeout=60)  # noqa: E731
        assert who().status_code == 200
        with postgres.frozen():
            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(who, range(16)))
            took = time.monotonic() - t0
        assert [r.status_code for r in answers] == [503] * 16
        assert "database is unavailable" in answers[0].json()["detail"]
        assert took < 45, f"16 calls took {took:.0f} s"
        t0 = time.monotonic()
        assert who().json()["user"] == "kim" and time.monotonic() - t0 < 5
    e.dispose()
