"""The labeling app on a real uvicorn server on loopback: many concurrent labelers never lose or
double a label, and a kill -9 of the server loses no stored label (docs/labeling.md#database-concurrency-and-durability)."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rlxf.labeling.accounts import add_user
from rlxf.labeling.items import push_items
from rlxf.labeling.report import label_rows
from rlxf.labeling.schema import open_engine

SRC = Path(__file__).resolve().parents[1] / "src"


class Api:
    """One keep-alive HTTP connection with a Bearer token."""

    def __init__(self, url: str, token: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body=None):
        self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")


def label_until_done(api: Api, rng: random.Random, results: list, replay: bool) -> None:
    while True:
        status, item = api.call("GET", "/api/next")
        assert status == 200, item
        if item["id"] is None:
            return
        body = {"id": item["id"], "choice": rng.randrange(len(item["completions"]))}
        status, _ = api.call("POST", "/api/label", body)
        results.append((item["id"], status))
        if replay:  # the same label again, as a client retrying after a lost answer would
            results.append((item["id"], api.call("POST", "/api/label", body)[0]))


def test_many_concurrent_labelers_never_lose_or_double_a_label(label_db):
    from rlxf.labeling.server import make_server

    db = label_db
    engine = open_engine(db)
    names = [f"l{i}" for i in range(12)]
    tokens = {n: add_user(engine, n, queue_names=("single", "triple")) for n in names}
    push_items(engine, "single", [{"prompt": f"s{i}", "completions": ["a", "b"]} for i in range(60)])
    push_items(engine, "triple", [{"prompt": f"t{i}", "completions": ["a", "b", "c"]} for i in range(10)], overlap=3)
    engine.dispose()
    server = make_server(db)
    try:
        results: list = []
        threads = [threading.Thread(target=label_until_done,
                                    args=(Api(server.url, tokens[n]), random.Random(i), results, i % 3 == 0))
                   for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        rows = label_rows(server.engine)
    finally:
        server.stop()
    statuses = Counter(status for _, status in results)
    assert set(statuses) <= {200, 409}, statuses          # replays answer 409; nothing else fails
    assert statuses[200] == len(rows) == 60 + 10 * 3
    per_item = Counter(r["item_id"] for r in rows)
    assert Counter(per_item.values()) == {1: 60, 3: 10}
    assert len({(r["item_id"], r["labeler"]) for r in rows}) == len(rows)   # no labeler twice on an item


def start_server(db: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "rlxf", "label", "serve", "--db", db, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("rlxf label serve: http://"), line + proc.stdout.read()
    return proc, line.split()[3].rstrip("/")


@pytest.mark.slow
def test_kill_dash_9_loses_no_stored_label(tmp_path):
    db = str(tmp_path / "crash.db")
    engine = open_engine(db)
    token = add_user(engine, "ann")
    push_items(engine, "default", [{"prompt": f"p{i}", "completions": ["a", "b"]} for i in range(40)])
    engine.dispose()
    proc, url = start_server(db)
    acknowledged = 0
    try:
        api = Api(url, token)
        for _ in range(25):
            status, item = api.call("GET", "/api/next")
            status, _ = api.call("POST", "/api/label", {"id": item["id"], "choice": 0})
            assert status == 200
            acknowledged += 1
        api.call("GET", "/api/next")            # an item is leased when the server dies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    proc, url = start_server(db)               # the restarted server sees every acknowledged label
    try:
        api = Api(url, token)
        status, item = api.call("GET", "/api/next")
        assert item["progress"]["done"] == acknowledged == 25
        assert api.call("POST", "/api/label", {"id": item["id"], "choice": 1})[0] == 200
        api.conn.close()
    finally:
        proc.terminate()
        proc.wait(30)
    engine = open_engine(db)
    assert len(label_rows(engine)) == 26
    engine.dispose()


def test_push_and_export_through_a_running_server(tmp_path, monkeypatch, capsys):
    from rlxf.cli import main
    from rlxf.labeling.server import make_server

    db = str(tmp_path / "remote.db")
    engine = open_engine(db)
    owner, labeler = add_user(engine, "lead", role="owner"), add_user(engine, "ann", queue_names=())
    engine.dispose()
    server = make_server(db)
    try:
        items = tmp_path / "items.jsonl"
        items.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(3)))
        monkeypatch.delenv("RLXF_LABEL_TOKEN", raising=False)
        assert main(["label", "push", "--server", server.url, "--file", str(items)]) == 2
        assert "needs an owner token: set RLXF_LABEL_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("RLXF_LABEL_TOKEN", labeler)
        assert main(["label", "push", "--server", server.url, "--file", str(items)]) == 2
        assert "HTTP 403: only an owner may do this" in capsys.readouterr().err
        monkeypatch.setenv("RLXF_LABEL_TOKEN", owner)
        assert main(["label", "push", "--server", server.url, "--file", str(items), "--queue", "thumbs", "--kind",
                     "rate", "--assign", "*"]) == 0
        api = Api(server.url, labeler)
        while (item := api.call("GET", "/api/next")[1])["id"] is not None:
            assert api.call("POST", "/api/label", {"id": item["id"], "rating": int(item["prompt"] != "p1")})[0] == 200
        out = tmp_path / "kto.jsonl"
        assert main(["label", "export", "--server", server.url, "--format", "kto", "--output", str(out)]) == 0
    finally:
        server.stop()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["completion"], r["label"]) for r in rows) == [("c0", True), ("c1", False), ("c2", True)]
