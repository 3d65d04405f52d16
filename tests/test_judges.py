"""rlxf.judges: the Judge's arithmetic (soft labels, both orders, d-RLAIF, LMGT), the local backend's
option log-probs, the HTTP backend against `rlxf serve` and against a scripted fake server
(retries, backoff, no retry on 400, timeouts, cache, concurrency limit)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlxf.judges import COMPACT, STANDARD, Judge, JudgeError, build_judge
from rlxf.judges.http import HTTPBackend


class ScriptedBackend:
    """Answers option log-prob questions with a function of (messages, options); counts calls."""

    def __init__(self, fn, name="scripted"):
        self.fn, self.name, self.asked = fn, name, []

    def chat(self, messages, *, max_tokens=256, temperature=0.0):
        return "ok"

    def option_logprobs(self, messages, options):
        self.asked.append(messages[0]["content"])
        return self.fn(messages[0]["content"], options)


def always_first(text, options):
    """A judge with pure position bias: always answers the first option."""
    return [0.0] + [-10.0] * (len(options) - 1)


def knows_best(text, options):
    """Prefers whichever shown answer contains 'good' (P = 0.8), in any position."""
    a_good = text.index("(A)") < text.index("good") < text.index("(B)")
    return [math.log(0.8), math.log(0.2)] if a_good else [math.log(0.2), math.log(0.8)]


PROMPTS, A, B = ["q1", "q2", "q3"], ["good x", "bad y", "good z"], ["bad x", "good y", "bad z"]


def test_both_orders_removes_position_bias():
    biased = Judge(ScriptedBackend(always_first), both_orders=True)
    assert biased.prefer(PROMPTS, A, B) == [0.5, 0.5, 0.5]
    stats = biased.stats
    assert stats["p_first_before"] == pytest.approx(1 / (1 + math.exp(-10)))
    assert stats["p_first_after"] == 0.5 and stats["p_first_position"] == pytest.approx(1.0, abs=1e-4)
    assert stats["calls"] == 6 and stats["prefer_pairs"] == 3 and stats["failures"] == 0

    one_order = Judge(ScriptedBackend(always_first), both_orders=False)
    assert one_order.prefer(PROMPTS, A, B) == pytest.approx([1.0] * 3, abs=1e-4)
    assert one_order.stats["calls"] == 3


def test_prefer_is_a_soft_label_and_order_consistent():
    backend = ScriptedBackend(knows_best)
    judge = Judge(backend, both_orders=True)
    assert judge.prefer(PROMPTS, A, B) == pytest.approx([0.8, 0.2, 0.8])
    assert judge.prefer(PROMPTS, B, A) == pytest.approx([0.2, 0.8, 0.2])
    # the rendered question carries the prompt, both answers (swapped in the second order) and the principle
    asked = backend.asked[0]
    assert "Human: q1" in asked and "(A) good x" in asked and "(B) bad x" in asked and STANDARD.principle in asked
    assert "(A) bad x" in backend.asked[3]
    Judge(backend).prefer(["q"], ["good"], ["bad"], principle="Pick the kinder one.")
    assert "Pick the kinder one." in backend.asked[-1]


def test_score_is_expected_rating_on_1_to_10():
    def peaked(text, options):
        return [0.0 if o == "7" else -math.inf for o in options]

    judge = Judge(ScriptedBackend(peaked))
    assert judge.score(["q"], ["c"]) == [8.0]  # digit d means rating d + 1
    uniform = Judge(ScriptedBackend(lambda text, options: [0.0] * len(options)))
    assert uniform.score(["q", "r"], ["c", "d"], rubric="Be strict.") == pytest.approx([5.5, 5.5])
    two = Judge(ScriptedBackend(lambda text, options: [math.log(0.5) if o in "09" else -math.inf
                                                       for o in options]))
    assert two.score(["q"], ["c"]) == [pytest.approx(0.5 * 1 + 0.5 * 10)]


@pytest.mark.parametrize("logps,expected", [([0, -5, -5], 1), ([-5, 0, -5], 0), ([-5, -5, 0], -1),
                                            ([0, -5, 0], 0), ([0, 0, -5], 0)])
def test_shift_is_argmax_with_ties_neutral(logps, expected):
    backend = ScriptedBackend(lambda text, options: [float(x) for x in logps])
    judge = Judge(backend)
    assert judge.shift(["q"], ["c"], knowledge="Sums are exact.") == [expected]
    assert "Background knowledge:\nSums are exact." in backend.asked[0]
    Judge(backend).shift(["q"], ["c"])
    assert "Background knowledge" not in backend.asked[-1]


def test_failures_are_none_and_counted():
    def flaky(text, options):
        return None if "q2" in text else [0.0, -1.0]

    judge = Judge(ScriptedBackend(flaky), both_orders=True)
    out = judge.prefer(PROMPTS, A, B)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert judge.stats["failures"] == 2 and judge.stats["prefer_pairs"] == 2
    for bad in ([float("nan"), 0.0], [-math.inf, -math.inf], [0.0], "xx"):
        judge = Judge(ScriptedBackend(lambda text, options, bad=bad: bad))
        assert judge.score(["q"], ["c"]) == [None] and judge.shift(["q"], ["c"]) == [None]
        assert judge.stats["failures"] == 2


def test_judge_cache_never_repeats_a_question(tmp_path):
    backend = ScriptedBackend(knows_best)
    first = Judge(backend, cache_dir=str(tmp_path))
    labels = first.prefer(PROMPTS, A, B)
    assert len(backend.asked) == 6 and first.stats["cache_hits"] == 0
    second = Judge(backend, cache_dir=str(tmp_path))  # a new run over the same directory
    assert second.prefer(PROMPTS, A, B) == labels
    assert len(backend.asked) == 6 and second.stats["cache_hits"] == 6 and second.stats["calls"] == 6
    other_model = Judge(ScriptedBackend(knows_best, name="another"), cache_dir=str(tmp_path))
    other_model.prefer(PROMPTS, A, B)
    assert other_model.stats["cache_hits"] == 0  # the backend's name is part of the key


def test_argument_errors():
    judge = Judge(ScriptedBackend(always_first))
    with pytest.raises(JudgeError, match="one entry per example"):
        judge.prefer(["q"], ["a", "b"], ["c"])
    with pytest.raises(JudgeError, match="neither"):
        build_judge("gpt-4")
    with pytest.raises(JudgeError, match="needs a model"):
        build_judge("local:")
    with pytest.raises(ValueError, match="unknown judge prompt set"):
        Judge(ScriptedBackend(always_first), prompts="fancy")


# -- the local backend -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_backend(tiny_random_model_dir):
    torch.set_num_threads(1)
    from rlxf.judges.local import LocalBackend

    return LocalBackend.from_pretrained(str(tiny_random_model_dir), device="cpu", max_batch_size=3)


def test_local_option_logprobs_are_whole_string_logprobs(random_backend):
    from rlxf.judges.local import chat_prompt_ids

    model, tokenizer = random_backend.model, random_backend.tokenizer
    messages = [{"role": "user", "content": "Which is better?"}]
    options = ["A", "B", "10"]
    got = random_backend.option_logprobs(messages, options)
    prefix = chat_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(prefix).endswith("<|assistant|>")
    for option, value in zip(options, got):
        ids = prefix + tokenizer(option, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()         # [T, V]
        logps = torch.log_softmax(logits, -1)
        expected = sum(float(logps[t - 1, ids[t]]) for t in range(len(prefix), len(ids)))
        assert value == pytest.approx(expected, abs=1e-4)
    # batched (micro-batches of 3 rows, mixed lengths) equals one at a time
    many = [[{"role": "user", "content": "x" * k}] for k in (1, 7, 30)]
    batched = random_backend.option_logprobs_batch(many, options)
    for m, row in zip(many, batched):
        assert row == pytest.approx(random_backend.option_logprobs(m, options), abs=1e-5)


def test_local_too_long_is_a_counted_failure(random_backend):
    from rlxf.judges.local import LocalBackend

    short = LocalBackend(random_backend.model, random_backend.tokenizer, max_length=20)
    long_messages = [{"role": "user", "content": "y" * 40}]
    assert short.option_logprobs(long_messages, ["A", "B"]) is None
    assert short.chat(long_messages, max_tokens=4) is None
    assert short.stats == {"calls": 2, "failures": 2}
    assert isinstance(random_backend.chat([{"role": "user", "content": "1+1=?"}], max_tokens=5), str)


def test_plain_rendering_without_chat_template(random_backend):
    from rlxf.judges.local import chat_prompt_ids

    tokenizer = random_backend.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user: hi\nassistant:"


# -- HTTP against rlxf serve (loopback) --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server():
    torch.set_num_threads(1)
    from rlxf.judges.local import LocalBackend
    from rlxf.serve import make_server

    local = LocalBackend.from_pretrained("tiny", device="cpu")
    server, thread = make_server("tiny", "127.0.0.1", 0, max_top_logprobs=103, model=local.model,
                                 tokenizer=local.tokenizer)
    yield server, local
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _pairs(n=4):
    from rlxf.tasks import get_task

    rows = get_task("arithmetic").preference_rows("eval", n, kind="mixed")
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def test_http_backend_matches_local_backend(tiny_server):
    server, local = tiny_server
    remote = HTTPBackend(server.base_url, top_logprobs=103, concurrency=2)
    assert remote.name == f"http:{server.base_url}|tiny"  # model id found through GET /models
    messages = COMPACT.render_pairwise("12+34=?", " 12+34=46. #46", " 12+34=47. #47")
    options = ["1", "2", "#", " "]
    assert remote.option_logprobs(messages, options) == pytest.approx(local.option_logprobs(messages, options),
                                                                      abs=1e-4)
    chat = [{"role": "user", "content": "12+34=?"}]
    assert remote.chat(chat, max_tokens=20) == local.chat(chat, max_tokens=20) == "12+34=46. #46"
    prompts, chosen, rejected = _pairs()
    via_http = Judge(remote, prompts="compact").prefer(prompts, chosen, rejected)
    in_process = Judge(local, prompts="compact").prefer(prompts, chosen, rejected)
    assert via_http == pytest.approx(in_process, abs=1e-4) and None not in via_http
    assert remote.stats["failures"] == 0 and remote.stats["retries"] == 0


def test_http_top20_reads_present_options_and_fails_when_none_are(tiny_server):
    server, local = tiny_server
    remote = HTTPBackend(server.base_url)  # the OpenAI limit: 20 first-token alternatives
    chat = [{"role": "user", "content": "12+34=?"}]
    got = remote.option_logprobs(chat, ["1", "A"])  # "1" starts the tiny model's answer; "A" is far down
    assert got[0] == pytest.approx(local.option_logprobs(chat, ["1"])[0], abs=1e-4) and got[1] == -math.inf
    assert remote.option_logprobs(chat, ["A", "B"]) is None
    assert remote.stats["failures"] == 1


def test_build_judge_specs(tiny_server, tmp_path):
    server, _ = tiny_server
    judge = build_judge(server.base_url, prompts="compact", top_logprobs=103, cache_dir=str(tmp_path))
    prompts, chosen, rejected = _pairs(2)
    labels = judge.prefer(prompts, chosen, rejected)
    assert judge.prefer(prompts, chosen, rejected) == labels
    assert judge.stats["cache_hits"] == 4 and judge.backend.stats["requests"] == 5  # 4 + GET /models
    local = build_judge("local:tiny", device="cpu", prompts="compact", both_orders=False)
    assert local.backend.name == "local:tiny" and not local.both_orders


# -- HTTP against a scripted fake server ------------------------------------------------------

def _completion(top: dict[str, float]) -> dict:
    first = max(top, key=top.get)
    entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": first},
                         "logprobs": {"content": [{"token": first, "logprob": top[first], "top_logprobs": entries}]},
                         "finish_reason": "length"}]}


class FakeServer:
    """Answers POSTs from a script of (status, payload, delay) steps (the last one repeats)."""

    def __init__(self, script):
        self.script, self.requests, self.headers = list(script), [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply(200, {"object": "list", "data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    step = fake.script[min(len(fake.requests), len(fake.script)) - 1]
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                status, payload, delay = step
                time.sleep(delay)
                with fake.lock:
                    fake.in_flight -= 1
                try:
                    self._reply(status, payload, {"Retry-After": "0"} if status == 429 else None)
                except OSError:  # the client timed out and left
                    pass

            def _reply(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(script):
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


OK = (200, _completion({"A": math.log(0.7), " B": math.log(0.2), "C": math.log(0.1)}), 0.0)
ERROR = {"error": {"message": "boom", "type": "server_error"}}
MSG = [{"role": "user", "content": "pick"}]


def test_retries_5xx_and_429_with_backoff(fake_server):
    fake = fake_server([(500, ERROR, 0.0), (429, ERROR, 0.0), OK])
    backend = HTTPBackend(fake.url, "m", backoff=0.05, max_retries=3)
    start = time.perf_counter()
    got = backend.option_logprobs(MSG, ["A", "B", "D"])
    assert got == pytest.approx([math.log(0.7), math.log(0.2), -math.inf])  # " B" matches "B"; D absent
    assert time.perf_counter() - start >= 0.05  # the first backoff (the 429 says Retry-After: 0)
    assert len(fake.requests) == 3 and backend.stats["retries"] == 2 and backend.stats["failures"] == 0
    body = fake.requests[0]
    assert body["model"] == "m" and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["messages"] == MSG


def test_retries_are_bounded(fake_server):
    fake = fake_server([(503, ERROR, 0.0)])
    backend = HTTPBackend(fake.url, "m", backoff=0.0, max_retries=2)
    assert backend.chat(MSG) is None
    assert len(fake.requests) == 3 and backend.stats == {"calls": 1, "requests": 3, "retries": 2, "failures": 1,
                                                          "cache_hits": 0}


def test_no_retry_on_400(fake_server):
    fake = fake_server([(400, {"error": {"message": "bad field", "type": "invalid_request_error"}}, 0.0), OK])
    backend = HTTPBackend(fake.url, "m", backoff=0.0)
    assert backend.option_logprobs(MSG, ["A", "B"]) is None
    assert len(fake.requests) == 1 and backend.stats["failures"] == 1 and backend.stats["retries"] == 0
    judge = Judge(backend, both_orders=False)
    assert judge.prefer(["q"], ["a"], ["b"]) == [pytest.approx(0.7 / 0.9)]  # the next request succeeds


def test_timeout_is_a_counted_failure(fake_server):
    fake = fake_server([(200, OK[1], 1.0)])
    backend = HTTPBackend(fake.url, "m", timeout=0.2, max_retries=1, backoff=0.0)
    judge = Judge(backend, both_orders=False)
    start = time.perf_counter()
    assert judge.prefer(["q"], ["a"], ["b"]) == [None]
    assert time.perf_counter() - start < 0.9
    assert backend.stats["requests"] == 2 and backend.stats["failures"] == 1 and judge.stats["failures"] == 1


def test_connection_refused_is_a_counted_failure():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    backend = HTTPBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.0, timeout=2)
    assert backend.chat(MSG) is None and backend.stats["failures"] == 1 and backend.stats["requests"] == 2


def test_http_cache_and_api_key(fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RLXF_TEST_KEY", "sk-secret-123")
    fake = fake_server([OK])
    backend = HTTPBackend(fake.url, "m", api_key_env="RLXF_TEST_KEY", cache_dir=str(tmp_path))
    first = backend.option_logprobs(MSG, ["A", "B"])
    again = HTTPBackend(fake.url, "m", api_key_env="RLXF_TEST_KEY", cache_dir=str(tmp_path))
    assert again.option_logprobs(MSG, ["A", "B"]) == first
    assert len(fake.requests) == 1 and again.stats["cache_hits"] == 1 and again.stats["requests"] == 0
    assert fake.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert not any("sk-secret" in p.read_text() for p in tmp_path.rglob("*.json"))
    assert backend.chat(MSG, temperature=1.0) == backend.chat(MSG, temperature=1.0) == "A"
    assert len(fake.requests) == 3  # sampled requests are not cached
    assert Judge(again).stats["cache_hits"] == 1  # the judge reports its backend's hits


def test_concurrency_limit_and_model_discovery(fake_server):
    fake = fake_server([(200, OK[1], 0.05)])
    backend = HTTPBackend(fake.url, concurrency=2)
    out = backend.option_logprobs_batch([[{"role": "user", "content": str(i)}] for i in range(6)], ["A", "B"])
    assert len(out) == 6 and all(o == pytest.approx([math.log(0.7), math.log(0.2)]) for o in out)
    assert fake.max_in_flight <= 2 and backend.model == "fake-model"
    assert [r["messages"][0]["content"] for r in sorted(fake.requests, key=lambda r: r["messages"][0]["content"])] \
        == [str(i) for i in range(6)]


def test_unusable_responses_are_failures(fake_server):
    fake = fake_server([(200, {"choices": [{"message": {"content": "A"}}]}, 0.0)])
    backend = HTTPBackend(fake.url, "m")
    assert backend.option_logprobs(MSG, ["A", "B"]) is None  # a server without logprobs support
    assert backend.chat(MSG) == "A" and backend.stats["failures"] == 1
