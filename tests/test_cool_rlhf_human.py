"""COOL-RLHF live rounds with human labels (``--labels http://HOST:PORT`` or a database): the round's
samples go to a labeling queue, a scripted labeler answers through the API, the loop waits with a
timeout policy and turns the choices into preference rows (docs/labeling.md#live-rounds)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
import urllib.request

import pytest

from rlxf.config import ConfigError
from rlxf.data.online_labels import SampleGroup
from rlxf.labeling.accounts import add_user
from rlxf.labeling.schema import open_engine
from rlxf.workflows.cool_rlhf import CoolRLHFConfig
from rlxf.workflows.cool_rlhf.human import human_labels, queue_name

CONDITIONS = {"arithmetic": "Answer with the number only."}


def groups():
    return [SampleGroup(prompt=f"{i}+{i}=", domain="arithmetic", answer=str(2 * i), reference=str(2 * i),
                        texts=[f"{2 * i + 1}", f"{2 * i}", f"{2 * i}", f"{2 * i + 3}"], correct=[False, True, True, False])
            for i in range(5)] + [SampleGroup(prompt="same", domain="arithmetic", answer="1", reference="1",
                                              texts=["1", "1"], correct=[True, True])]


def the_sum(item: dict) -> int:
    a, _ = item["prompt"].rstrip("=").split("+")
    return item["completions"].index(str(2 * int(a)))


def scripted_labeler(url: str, token: str, stop: threading.Event, seen: list, choose=the_sum) -> None:
    """Answers every item it gets until ``stop``: ``choose(item)`` is the better completion."""
    def call(method, path, body=None):
        request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    while not stop.is_set():
        item = call("GET", "/api/next")
        if item["id"] is None:
            stop.wait(0.05)
            continue
        seen.append(item)
        call("POST", "/api/label", {"id": item["id"], "choice": choose(item)})


@contextmanager
def labelling(url: str, token: str, choose=the_sum):
    """The scripted labeler in a thread while the block runs; yields the items it got."""
    stop, seen = threading.Event(), []
    worker = threading.Thread(target=scripted_labeler, args=(url, token, stop, seen, choose))
    worker.start()
    try:
        yield seen
    finally:
        stop.set()
        worker.join(30)


@pytest.fixture
def live(tmp_path, monkeypatch):
    """A labeling server with an owner (its token in RLXF_LABEL_TOKEN) and a labeler: ``(server, token)``."""
    from rlxf.labeling.server import make_server

    db = str(tmp_path / "labels.db")
    engine = open_engine(db)
    owner, labeler = add_user(engine, "lead", role="owner"), add_user(engine, "ann")
    engine.dispose()
    server = make_server(db)
    monkeypatch.setenv("RLXF_LABEL_TOKEN", owner)
    yield server, labeler
    server.stop()


def test_a_round_waits_for_the_scripted_labeler_and_returns_its_pairs(live, tmp_path):
    server, labeler = live
    cfg = CoolRLHFConfig(labels=server.url, output_dir=str(tmp_path / "loop"), human_timeout=60)
    with labelling(server.url, labeler) as seen:
        rows, stats = human_labels(cfg, groups(), 1, CONDITIONS, poll=0.05)
        again, _ = human_labels(cfg, groups(), 1, CONDITIONS, poll=0.05)   # a re-run reuses the labels
    assert len(seen) == 5                       # the group with one distinct text is not an item
    assert seen[0]["condition"] == CONDITIONS["arithmetic"] and seen[0]["completions"] == ["1", "0", "3"]
    assert stats["human/items"] == stats["human/complete"] == stats["human/labels"] == 5
    assert stats["human/timed_out"] == 0.0 and stats["human/alpha"] is None   # overlap 1: nothing to agree on
    assert len(rows) == 10 and all(r["chosen"] == r["answer"] != r["rejected"] for r in rows)
    assert {r["pair_kind"] for r in rows} == {"human"} and {r["domain"] for r in rows} == {"arithmetic"}
    assert rows[0]["labeler"] == "ann" and again == rows


def test_the_timeout_policy(tmp_path):
    db = str(tmp_path / "labels.db")
    engine = open_engine(db)
    add_user(engine, "ann")
    engine.dispose()
    common = {"labels": db, "output_dir": str(tmp_path / "loop"), "human_timeout": 0.2}
    rows, stats = human_labels(CoolRLHFConfig(**common), groups(), 2, CONDITIONS, poll=0.05)
    assert rows == [] and stats["human/timed_out"] == 1.0 and stats["human/items"] == 5
    with pytest.raises(ConfigError, match="0 of 5 items were labelled within --human-timeout 0.2 s"):
        human_labels(CoolRLHFConfig(**common, human_on_timeout="fail"), groups(), 2, CONDITIONS, poll=0.05)
    assert queue_name(CoolRLHFConfig(**common), 2).startswith("cool-r2-")


def test_labels_option_takes_a_server_or_database_and_nothing_else():
    assert CoolRLHFConfig(labels="http://127.0.0.1:8100").labels.startswith("http")
    assert CoolRLHFConfig(labels="sqlite:///labels.db").labels
    assert CoolRLHFConfig(labels="labels.db").labels
    with pytest.raises(ConfigError, match="is not one of verifier, judge, file, a labeling server URL"):
        CoolRLHFConfig(labels="humans")


def test_a_server_without_an_owner_token_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RLXF_LABEL_TOKEN", raising=False)
    cfg = CoolRLHFConfig(labels="http://127.0.0.1:9", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="needs an owner token: set RLXF_LABEL_TOKEN"):
        human_labels(cfg, groups(), 1, CONDITIONS)


@pytest.mark.slow
def test_cool_rlhf_round_with_a_labeling_server_end_to_end(live, tiny_random_model_dir, tmp_path):
    """``rlxf cool-rlhf --labels http://...``: round 1's samples are labelled by a scripted labeler
    through the API and its pairs train the slow path; rounds.jsonl carries the human counts."""
    from test_cool_rlhf import LOOP_FAST

    from rlxf.cli import main
    from rlxf.workflows.cool_rlhf.data import read_jsonl

    server, labeler = live
    out = tmp_path / "cool"
    values = {**LOOP_FAST, "rounds": 1, "model": tiny_random_model_dir, "output_dir": out, "labels": server.url,
              "human_timeout": 120}
    with labelling(server.url, labeler, choose=lambda item: 0) as seen:
        assert main(["cool-rlhf", *[f"--{k.replace('_', '-')}={v}" for k, v in values.items()]]) == 0
    record = read_jsonl(out / "rounds.jsonl")[1]
    assert record["human/items"] == len(seen) == record["human/complete"] == record["human/labels"] > 0
    labels = read_jsonl(out / "round-1" / "labels.jsonl")
    assert record["labels/new"] == len(labels) == sum(len(item["completions"]) - 1 for item in seen)
    assert all(r["pair_kind"] == "human" and r["labeler"] == "ann" for r in labels)
    assert record["labels/total"] > len(labels)          # the slow path trained on round 0's pairs and these
