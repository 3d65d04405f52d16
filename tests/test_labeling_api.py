"""The labeling app's API in process (Starlette's TestClient): the attacks first, then the
hand-out rules, undo, exports, the migration mechanism and the command line (docs/labeling.md)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from rlxf.labeling import schema
from rlxf.labeling.accounts import LabelingError, User, add_user
from rlxf.labeling.app import COOKIE, CSP, build_app
from rlxf.labeling.items import push_items
from rlxf.labeling.report import export_rows, label_rows
from rlxf.labeling.schema import labels, open_engine
from rlxf.labeling.work import next_item, submit_label

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
SQLISH = "'); DROP TABLE labels; -- \" OR 1=1 --"
STATIC = Path(__file__).resolve().parents[1] / "src" / "rlxf" / "labeling" / "static"


@pytest.fixture
def lab(label_db):
    engine = open_engine(label_db)
    tokens = {"boss": add_user(engine, "boss", role="owner"), "ann": add_user(engine, "ann"),
              "bob": add_user(engine, "bob"), "carol": add_user(engine, "carol", queue_names=("other",))}
    rows = [{"prompt": f"q{i}", "completions": [f"a{i}", f"b{i}"], "key": f"k{i}"} for i in range(4)]
    push_items(engine, "default", rows)
    client = TestClient(build_app(engine, max_request_bytes=4096, max_push_bytes=64 * 1024))
    yield engine, tokens, client
    engine.dispose()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def live_labels(engine):
    with engine.begin() as conn:
        return conn.execute(select(func.count()).select_from(labels).where(labels.c.undone_at.is_(None))).scalar()


# -- attacks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic Ym9zczp4"},
                                     {"Authorization": "Bearer"}, {"Cookie": f"{COOKIE}=forged"}])
def test_a_request_without_a_valid_token_gets_401(lab, headers):
    _, _, client = lab
    for method, path in [("GET", "/api/next"), ("POST", "/api/label"), ("POST", "/api/undo"), ("GET", "/api/me"),
                         ("GET", "/api/owner/stats"), ("GET", "/api/owner/export"), ("POST", "/api/owner/items")]:
        response = client.request(method, path, headers=headers, json={"id": 1, "choice": 0})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_labelers_cannot_use_the_owner_paths(lab):
    _, tokens, client = lab
    assert client.get("/api/owner/stats", headers=bearer(tokens["ann"])).status_code == 403
    assert client.get("/api/owner/export?format=pairs", headers=bearer(tokens["ann"])).status_code == 403
    pushed = client.post("/api/owner/items", headers=bearer(tokens["ann"]), json={"queue": "default", "rows": []})
    assert pushed.status_code == 403


def test_tokens_and_sessions_are_stored_only_hashed(lab, tmp_path):
    engine, tokens, client = lab
    client.post("/api/login", json={"token": tokens["ann"]})
    cookie = client.cookies[COOKIE]
    with engine.begin() as conn:
        stored = set(conn.execute(select(schema.users.c.token_hash)).scalars())
        sessions = set(conn.execute(select(schema.sessions.c.token_hash)).scalars())
    assert hashlib.sha256(tokens["ann"].encode()).hexdigest() in stored
    assert hashlib.sha256(cookie.encode()).hexdigest() in sessions
    engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("labels.db*"))
    assert all(secret.encode() not in raw for secret in [*tokens.values(), cookie])


def test_cookie_login_has_safe_attributes_and_posts_need_the_csrf_token(lab):
    engine, tokens, client = lab
    login = client.post("/api/login", json={"token": tokens["ann"]})
    assert login.status_code == 200
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    csrf = login.json()["csrf"]
    item = client.get("/api/next").json()       # a GET with the cookie alone works
    forged = client.post("/api/label", json={"id": item["id"], "choice": 0})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf"
    wrong = client.post("/api/label", json={"id": item["id"], "choice": 0}, headers={"X-CSRF-Token": csrf[:-1] + "x"})
    assert wrong.status_code == 403
    assert client.post("/api/undo").status_code == 403
    assert live_labels(engine) == 0
    # a cross-site HTML form can only send form or text bodies: refused before anything else
    form = client.post("/api/label", content=b'{"id": 1, "choice": 0}', headers={"Content-Type": "text/plain",
                                                                               "X-CSRF-Token": csrf})
    assert form.status_code == 415
    ok = client.post("/api/label", json={"id": item["id"], "choice": 0}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and live_labels(engine) == 1
    assert client.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.get("/api/next").status_code == 401


def test_the_cookie_is_secure_over_https(lab):
    engine, tokens, _ = lab
    client = TestClient(build_app(engine), base_url="https://testserver")
    assert "secure" in client.post("/api/login", json={"token": tokens["ann"]}).headers["set-cookie"].lower()


def test_xss_payload_stays_text(lab):
    engine, tokens, client = lab
    push_items(engine, "default", [{"prompt": XSS, "completions": [XSS, "</pre><script>alert(1)</script>"],
                                    "priority": 9}])
    response = client.get("/api/next", headers=bearer(tokens["ann"]))
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["completions"][0] == XSS
    for path in ["/", "/owner", "/static/label.js", "/api/next", "/nope"]:
        assert client.get(path).headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP and "default-src 'none'" in CSP
    js = (STATIC / "label.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)
    for page in ("label.html", "owner.html"):
        html = (STATIC / page).read_text()
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/label.js" defer>']
        assert "style=" not in html and " on" not in re.sub(r"\s+", " ", html).replace(" only", "")


def test_oversized_bodies_get_413_and_long_texts_400(lab):
    engine, tokens, client = lab
    big = {"id": 1, "choice": 0, "reason": "x" * 5000}
    assert client.post("/api/label", headers=bearer(tokens["ann"]), json=big).status_code == 413
    rows = [{"prompt": "p" * 1000, "completions": ["a", "b"], "key": str(i)} for i in range(80)]
    too_big = client.post("/api/owner/items", headers=bearer(tokens["boss"]), json={"queue": "default", "rows": rows})
    assert too_big.status_code == 413 and "--max-push-bytes" in too_big.json()["error"]["message"]
    with pytest.raises(LabelingError, match="row 1: completions\\[0\\] has 100001 characters; at most 100000"):
        push_items(engine, "default", [{"prompt": "p", "completions": ["a" * 100_001, "b"]}])
    assert client.post("/api/login", json={"token": "x" * 5000}).status_code == 413


def test_another_labelers_item_id_is_not_found_and_queues_are_private(lab):
    engine, tokens, client = lab
    ann_item = client.get("/api/next", headers=bearer(tokens["ann"])).json()
    stolen = client.post("/api/label", headers=bearer(tokens["bob"]), json={"id": ann_item["id"], "choice": 1})
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "not_yours"
    assert client.post("/api/label", headers=bearer(tokens["bob"]), json={"id": 999, "choice": 0}).status_code == 404
    assert client.get("/api/next", headers=bearer(tokens["carol"])).json()["id"] is None  # not in queue default
    assert client.post("/api/label", headers=bearer(tokens["carol"]),
                       json={"id": ann_item["id"], "choice": 0}).status_code == 404
    assert live_labels(engine) == 0


def test_sql_like_strings_are_data(lab):
    engine, tokens, client = lab
    push_items(engine, "default", [{"prompt": SQLISH, "completions": [SQLISH, "b"], "key": SQLISH, "priority": 5}])
    item = client.get("/api/next", headers=bearer(tokens["ann"])).json()
    assert item["prompt"] == SQLISH
    assert client.post("/api/label", headers=bearer(tokens["ann"]),
                       json={"id": item["id"], "choice": 0, "reason": SQLISH}).status_code == 200
    rows = label_rows(engine)
    assert rows[0]["reason"] == SQLISH and rows[0]["item_key"] == SQLISH
    assert client.get("/api/owner/export?queue=" + SQLISH, headers=bearer(tokens["boss"])).text == ""
    with pytest.raises(Exception, match="not a valid name"):
        add_user(engine, "x'; DROP TABLE users; --")
    assert client.get("/api/owner/stats", headers=bearer(tokens["boss"])).status_code == 200


def test_a_replayed_label_is_refused_and_counted_once(lab):
    engine, tokens, client = lab
    item = client.get("/api/next", headers=bearer(tokens["ann"])).json()
    body = {"id": item["id"], "choice": 1}
    assert client.post("/api/label", headers=bearer(tokens["ann"]), json=body).status_code == 200
    replay = client.post("/api/label", headers=bearer(tokens["ann"]), json=body)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "already_labelled"
    assert live_labels(engine) == 1


@pytest.mark.parametrize("body,status", [
    ({"id": "1", "choice": 0}, 400), ({"id": True, "choice": 0}, 400), ({"id": 1.0, "choice": 0}, 400),
    ({"id": 1, "choice": 2}, 400), ({"id": 1, "choice": -1}, 400), ({"id": 1, "choice": "best"}, 400),
    ({"id": 1, "choice": True}, 400), ({"id": 1, "rating": 1}, 400), ({"id": 1, "choice": 0, "rating": 1}, 400),
    ({"id": 1, "choice": 0, "admin": True}, 400), ({"id": 1}, 400), ([1, 0], 400), ({"id": 2**70, "choice": 0}, 400),
    ({"id": 1, "choice": 0, "reason": 5}, 400),
])
def test_malformed_labels_are_400(lab, body, status):
    engine, tokens, client = lab
    client.get("/api/next", headers=bearer(tokens["ann"]))
    assert client.post("/api/label", headers=bearer(tokens["ann"]), json=body).status_code == status
    assert live_labels(engine) == 0


@pytest.mark.parametrize("raw", [b'{"id": 1, "choice": NaN}', b'{"id": 1, "id": 2, "choice": 0}', b"{", b"\xff",
                                 b"[" * 100 + b"]" * 100])
def test_bad_json_is_400(lab, raw):
    _, tokens, client = lab
    response = client.post("/api/label", content=raw, headers={**bearer(tokens["ann"]),
                                                                "Content-Type": "application/json"})
    assert response.status_code == 400


def test_failed_logins_are_limited(lab):
    _, tokens, client = lab
    codes = [client.post("/api/login", json={"token": f"guess{i}"}).status_code for i in range(21)]
    assert codes[:20] == [401] * 20 and codes[20] == 429
    assert client.post("/api/login", json={"token": tokens["ann"]}).status_code == 429


# -- hand-out rules, undo, versions ----------------------------------------------------------------

def test_an_item_goes_to_one_labeler_until_its_lease_expires(lab):
    engine = lab[0]
    ann, bob, carol = User(2, "ann", "labeler"), User(3, "bob", "labeler"), User(4, "carol", "labeler")
    first = next_item(engine, ann, now=1000.0)
    assert first["progress"] == {"done": 0, "remaining": 4}      # the item in hand counts as remaining
    assert next_item(engine, ann, now=1001.0)["id"] == first["id"]          # asking again: the same item
    bobs = next_item(engine, bob, now=1000.0)
    assert bobs["id"] not in (None, first["id"])
    assert next_item(engine, carol, now=1000.0)["id"] is None             # not a member of queue default
    # ann's lease (600 s) expires; bob finishes his item and then gets ann's
    submit_label(engine, bob, {"id": bobs["id"], "choice": 0}, now=1700.0)
    again = next_item(engine, bob, now=1700.0)
    assert again["id"] == first["id"] and again["progress"] == {"done": 1, "remaining": 3}
    with pytest.raises(LabelingError, match="no item"):
        submit_label(engine, ann, {"id": first["id"], "choice": 0}, now=1701.0)


def test_overlap_hands_an_item_to_that_many_labelers(lab):
    engine, tokens, client = lab
    push_items(engine, "double", [{"prompt": "p", "completions": ["a", "b"]}], overlap=2,
               assign=("ann", "bob", "carol"))
    with engine.begin() as conn:  # only the new queue for this test
        conn.execute(schema.members.delete().where(schema.members.c.queue_id == 1))
    got = [client.get("/api/next", headers=bearer(tokens[n])).json()["id"] for n in ("ann", "bob", "carol")]
    assert got[0] == got[1] is not None and got[2] is None
    for name, choice in (("ann", 0), ("bob", 1)):
        assert client.post("/api/label", headers=bearer(tokens[name]), json={"id": got[0], "choice": choice}).is_success
    stats = client.get("/api/owner/stats?queue=double", headers=bearer(tokens["boss"])).json()["queues"][0]
    assert stats["complete"] == 1 and stats["labels"] == 2 and stats["alpha_items"] == 1


def test_undo_gives_the_item_back_and_the_new_label_replaces_the_old(lab):
    engine, tokens, client = lab
    h = bearer(tokens["ann"])
    item = client.get("/api/next", headers=h).json()
    client.post("/api/label", headers=h, json={"id": item["id"], "choice": 0})
    client.get("/api/next", headers=h)  # the next item is leased meanwhile
    undone = client.post("/api/undo", headers=h).json()
    assert undone["id"] == item["id"] and undone["progress"]["done"] == 0
    assert client.post("/api/label", headers=h, json={"id": item["id"], "choice": 1}).is_success
    rows = export_rows(label_rows(engine), "pairs")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(item["completions"][1], item["completions"][0])]
    client.post("/api/undo", headers=h)
    client.post("/api/undo", headers=h)  # nothing older: 409, not a crash
    assert client.post("/api/undo", headers=h).status_code == 409


def test_a_new_version_of_an_item_is_labelled_afresh(lab):
    engine, tokens, client = lab
    h = bearer(tokens["ann"])
    push_items(engine, "v", [{"prompt": "p", "completions": ["a", "b"], "key": "x"}], assign=("ann",))
    with engine.begin() as conn:
        conn.execute(schema.members.delete().where(schema.members.c.queue_id == 1))
    item = client.get("/api/next", headers=h).json()
    client.post("/api/label", headers=h, json={"id": item["id"], "choice": 0})
    again = push_items(engine, "v", [{"prompt": "p", "completions": ["a", "c"], "key": "x"}])
    assert again["updated"] == 1
    fresh = client.get("/api/next", headers=h).json()
    assert fresh["id"] == item["id"] and fresh["version"] == 2 and fresh["completions"] == ["a", "c"]
    assert label_rows(engine, "v") == []        # the old label's text is gone: not exported


def test_exports_in_the_formats_the_recipes_read(lab):
    engine, tokens, client = lab
    push_items(engine, "thumbs", [{"prompt": "t", "completion": "good"}, {"prompt": "t2", "completion": "bad"}],
               kind="rate", scale="thumbs", assign=("ann",))
    push_items(engine, "scale", [{"prompt": "s", "completion": "ok", "domain": "math"}], kind="rate", scale="1-7",
               assign=("ann",))
    push_items(engine, "fix", [{"prompt": "e", "completion": "typo"}], kind="edit", assign=("ann",))
    h = bearer(tokens["ann"])
    answers = {"compare": [{"choice": 1}, {"choice": "tie"}, {"choice": "both_bad"}, {"choice": 0}],
               "thumbs": [{"rating": 1}, {"rating": 0}], "1-7": [{"rating": 6}], "edit": [{"edit": "fixed"}]}
    while (item := client.get("/api/next", headers=h).json())["id"] is not None:
        answer = answers[item["scale"] or item["kind"]].pop(0)
        assert client.post("/api/label", headers=h, json={"id": item["id"], **answer}).is_success
    rows = label_rows(engine)
    pairs = export_rows(rows, "pairs")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("q0", "b0", "a0"), ("q3", "a3", "b3")]
    assert pairs[0]["labeler"] == "ann" and pairs[0]["item_version"] == 1 and pairs[0]["labeled_at"].endswith("Z")
    kto = {(r["prompt"], r["completion"]): r["label"] for r in export_rows(rows, "kto")}
    assert kto == {("q0", "b0"): True, ("q0", "a0"): False, ("q2", "a2"): False, ("q2", "b2"): False,
                   ("q3", "a3"): True, ("q3", "b3"): False, ("t", "good"): True, ("t2", "bad"): False,
                   ("s", "ok"): True}
    assert next(r for r in export_rows(rows, "kto") if r["prompt"] == "s")["domain"] == "math"
    assert [(r["prompt"], r["completion"]) for r in export_rows(rows, "sft")] == [("e", "fixed")]
    csv_text = client.get("/api/owner/export?format=csv", headers=bearer(tokens["boss"])).text
    assert csv_text.splitlines()[0].startswith("label_id,queue,kind") and len(csv_text.splitlines()) == 9


def test_push_rows_are_checked_with_the_row_named(lab):
    _, tokens, client = lab
    bad = [({"completions": ["a", "b"]}, "row 1: prompt must be a string"),
           ({"prompt": "p", "completions": ["a"]}, "a compare item takes 2..16 completions, got 1"),
           ({"prompt": "p", "completions": ["a", 3]}, "completions[1] must be a string"),
           ({"prompt": "p", "completions": ["a", "b"], "priority": "high"}, "priority must be a finite number")]
    for row, message in bad:
        response = client.post("/api/owner/items", headers=bearer(tokens["boss"]), json={"queue": "q", "rows": [row]})
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    wrong_kind = client.post("/api/owner/items", headers=bearer(tokens["boss"]),
                             json={"queue": "default", "kind": "rate", "rows": [{"prompt": "p", "completion": "a"}]})
    assert wrong_kind.status_code == 409


# -- migrations ----------------------------------------------------------------------------------

def test_migrations_are_versioned_applied_once_and_keep_data(tmp_path, monkeypatch):
    path = str(tmp_path / "m.db")
    engine = open_engine(path)
    assert schema.current_version(engine) == schema.MIGRATIONS[-1][0] == 1
    add_user(engine, "ann")
    engine.dispose()
    calls = []

    def add_column(conn):
        calls.append(1)
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN email VARCHAR(200)")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, (2, "users.email", add_column)])
    engine = open_engine(path)
    engine2 = open_engine(path)               # a second opener applies nothing again
    assert schema.current_version(engine) == 2 and calls == [1]
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT name, email FROM users").all() == [("ann", None)]
    engine.dispose(), engine2.dispose()

    def broken(conn):
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN phone VARCHAR(20)")
        raise RuntimeError("step fails half way")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, (3, "broken", broken)])
    with pytest.raises(RuntimeError, match="half way"):
        open_engine(path)
    engine = open_engine(path, upgrade=False)
    assert schema.current_version(engine) == 2       # rolled back: no version 3, no phone column
    with engine.begin() as conn:
        assert "phone" not in [c[1] for c in conn.exec_driver_sql("PRAGMA table_info(users)").all()]
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    with pytest.raises(schema.SchemaError, match="newer than this rlxf knows"):
        open_engine(path)


# -- the command line -----------------------------------------------------------------------------

def test_cli_add_user_push_export(tmp_path, capsys):
    from rlxf.cli import main
    from rlxf.data import load_rows

    db = str(tmp_path / "cli.db")
    assert main(["label", "add-user", "lead", "--db", db, "--role", "owner"]) == 0
    assert main(["label", "add-user", "lead", "--db", db]) == 0          # a new token; still an owner
    lead = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    assert main(["label", "add-user", "ann", "--db", db]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"Q{i}", "completions": [f"good{i}", f"bad{i}"]}) + "\n"
                             for i in range(3)))
    assert main(["label", "push", "--db", db, "--file", str(items)]) == 0
    assert "3 added" in capsys.readouterr().out
    engine = open_engine(db)
    from rlxf.labeling.accounts import user_for_token

    ann = user_for_token(engine, token)
    assert user_for_token(engine, lead).role == "owner" and ann.role == "labeler"
    while (item := next_item(engine, ann))["id"] is not None:
        submit_label(engine, ann, {"id": item["id"], "choice": 0})
    engine.dispose()
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db, "--format", "pairs", "--output", str(out)]) == 0
    rows = load_rows(str(out), kind="preference")
    assert sorted(r["chosen"] for r in rows) == ["good0", "good1", "good2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["only one"]}\n')
    assert main(["label", "push", "--db", db, "--file", str(bad)]) == 2
    assert "row 1: a compare item takes 2..16 completions" in capsys.readouterr().err
    assert main(["label", "push", "--db", db]) == 2


@pytest.mark.slow  # importing TRL and datasets: ~10 s on a 2-core CPU
def test_kto_export_of_pairs_matches_trls_unpairing(lab):
    """For two-completion compare items, the kto export equals TRL's unpair_preference_dataset of
    the pairs export (chosen → True, rejected → False); with more completions rlxf marks the chosen
    one desirable once, not once per pair (docs/labeling.md#export)."""
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import unpair_preference_dataset

    engine, tokens, client = lab
    h = bearer(tokens["ann"])
    while (item := client.get("/api/next", headers=h).json())["id"] is not None:
        client.post("/api/label", headers=h, json={"id": item["id"], "choice": item["id"] % 2})
    rows = label_rows(engine)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in export_rows(rows, "pairs")]
    trl_rows = unpair_preference_dataset(datasets.Dataset.from_list(pairs)).to_list()
    ours = [{k: r[k] for k in ("prompt", "completion", "label")} for r in export_rows(rows, "kto")]
    def key(r):
        return r["prompt"], r["completion"], r["label"]

    assert sorted(ours, key=key) == sorted(trl_rows, key=key) and len(ours) == 8


@pytest.mark.slow  # loads and samples the tiny model twice: ~8 s on a 2-core CPU
def test_push_samples_from_a_model_or_a_run_and_orders_by_rm_margin(tmp_path, monkeypatch, capsys):
    import rlxf.rewards
    from rlxf.cli import main
    from rlxf.labeling.sample import sample_items

    db = str(tmp_path / "s.db")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final_model": "tiny"}))
    assert main(["label", "push", "--db", db, "--from-run", str(run), "--dataset", "task:arithmetic", "--limit", "3",
                 "--n", "2", "--max-new-tokens", "4", "--device", "cpu", "--queue", "sampled"]) == 0
    assert "3 added" in capsys.readouterr().out
    engine = open_engine(db)
    with engine.begin() as conn:
        stored = conn.execute(select(schema.items.c.completions, schema.items.c.meta)).all()
    engine.dispose()
    assert len(stored) == 3
    assert all(len(json.loads(c)) == 2 and json.loads(m)["model"] == "tiny" for c, m in stored)

    def fake_rm(**_context):  # score = length of the completion: a known margin per item
        return lambda prompts, completions, **_: [float(len(c)) for c in completions]

    monkeypatch.setattr(rlxf.rewards, "get_reward", lambda name, **ctx: fake_rm(**ctx))
    items = sample_items("tiny", "task:arithmetic", n=3, limit=4, max_new_tokens=6, device="cpu", reward_model="rm")
    for item in items:
        top = sorted((len(c) for c in item["completions"]), reverse=True)
        assert item["priority"] == -(top[0] - top[1])
    with pytest.raises(ValueError, match="names no final_model"):
        (run / "summary.json").write_text("{}")
        from rlxf.labeling.sample import run_model

        run_model(str(run))


def test_cli_stats_prints_alpha(lab, capsys):
    from rlxf.cli import main

    engine, tokens, client = lab
    push_items(engine, "pair", [{"prompt": f"p{i}", "completions": ["a", "b"]} for i in range(3)], overlap=2,
               assign=("ann", "bob"))
    for name in ("ann", "bob"):
        h = bearer(tokens[name])
        while (item := client.get("/api/next", headers=h).json())["id"] is not None:
            choice = 0 if item["queue"] == "pair" and (name == "ann" or item["prompt"] != "p2") else 1
            client.post("/api/label", headers=h, json={"id": item["id"], "choice": choice})
    db = engine.url.render_as_string(hide_password=False)
    assert main(["label", "stats", "--db", db, "--queue", "pair"]) == 0
    out = capsys.readouterr().out
    # units [0,0], [0,0], [0,1]: o_00 = 4, o_01 = o_10 = 1, n = 6, n_0 = 5, n_1 = 1;
    # alpha = 1 - (n - 1) * (o_01 + o_10) / (2 * n_0 * n_1) = 1 - 5 * 2 / 10 = 0
    assert "Krippendorff's alpha 0.000 (nominal, 3 items)" in out
    assert "pair: compare, 3 items, 3 complete, 6 labels" in out


def test_label_help_imports_no_database_or_web_stack():
    import subprocess
    import sys

    code = ("import sys\nfrom rlxf.cli import main\ntry:\n    main(['label', 'serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('torch', 'sqlalchemy', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                         env={"PYTHONPATH": str(STATIC.parents[2]), "PATH": "/usr/bin:/bin"})
    assert "--secure-cookies" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout[-300:] + out.stderr


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path, capsys):
    from rlxf.cli import main

    assert main(["label", "stats", "--db", "nosuchdialect://x/y"]) == 2
    assert "rlxf label stats: --db nosuchdialect://x/y: cannot open this database" in capsys.readouterr().err
    assert main(["label", "stats", "--db", str(tmp_path / "missing-dir" / "sub")]) == 0   # a new SQLite file
    (tmp_path / "notadb.db").write_text("this is not SQLite")
    assert main(["label", "stats", "--db", str(tmp_path / "notadb.db")]) == 2
    assert "database error" in capsys.readouterr().err
