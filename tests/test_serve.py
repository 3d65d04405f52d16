"""`rlxf serve`: OpenAI-compatible answers over loopback, and every refusal (4xx) it promises."""

from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.error
import urllib.request

import pytest
import torch

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    from rlxf.serve import make_server

    srv, thread = make_server("tiny", "127.0.0.1", 0, device="cpu", max_request_bytes=MAX_BYTES,
                              max_tokens_limit=64, max_n=4, max_top_logprobs=103)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _request(server, path: str, body=None, *, method: str | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.base_url.removesuffix("/v1") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers


def _chat(server, body):
    return _request(server, "/v1/chat/completions", body)


def test_models_and_health(server):
    status, body, _ = _request(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"] and body["data"][0]["max_model_len"] == 256
    assert _request(server, "/v1/models/tiny")[1]["id"] == "tiny"
    assert _request(server, "/health")[1] == {"status": "ok"}


def test_a_vanishing_temperature_samples_greedily_instead_of_failing(server):
    """A positive temperature too small to divide logits by (7e-289, a value the HTTP fuzz test sends,
    would make every probability inf/nan and the request a 500) samples greedily, as temperature 0 does."""
    messages = [{"role": "user", "content": "1+1=?"}]
    greedy = _chat(server, {"messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True})
    for temperature in (7.077922908764046e-289, 1e-9):
        status, body, _ = _chat(server, {"messages": messages, "max_tokens": 8, "temperature": temperature,
                                         "logprobs": True})
        assert status == 200, body
        assert body["choices"][0]["message"] == greedy[1]["choices"][0]["message"]


def test_plain_openai_style_request(server):
    from rlxf.judges.local import LocalBackend, chat_prompt_ids

    service = server.service
    messages = [{"role": "user", "content": "12+34=?"}]
    status, body, headers = _chat(server, {"model": "tiny", "messages": messages, "max_tokens": 24,
                                           "temperature": 0})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    # greedy: the same text the in-process judge backend generates from the same weights
    local = LocalBackend(service.model, service.tokenizer)
    assert choice["message"]["content"] == local.chat(messages, max_tokens=24) == "12+34=46. #46"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(chat_prompt_ids(service.tokenizer, messages))
    assert usage["completion_tokens"] == len("12+34=46. #46") + 1  # + EOS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "12+34=?"}],
                                           max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == "12+34=46. #46"


def test_logprobs_openai_shape(server):
    status, body, _ = _chat(server, {"messages": [{"role": "user", "content": "5+7=?"}], "max_tokens": 8,
                                     "temperature": 0, "logprobs": True, "top_logprobs": 103})
    assert status == 200
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 103 and set(top[0]) == {"token", "logprob", "bytes"}
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert math.isclose(sum(math.exp(v) for v in values), 1.0, rel_tol=1e-4)  # the whole vocabulary
        assert entry["token"] == top[0]["token"] and entry["logprob"] == pytest.approx(values[0])  # greedy
        assert entry["bytes"] == list(entry["token"].encode())


def test_sampling_n_seed_and_stop(server):
    body = {"messages": [{"role": "user", "content": "12+34=?"}], "max_tokens": 16, "temperature": 1.0,
            "n": 3, "seed": 7}
    first, second = _chat(server, body)[1], _chat(server, body)[1]
    assert len(first["choices"]) == 3 and [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in second["choices"]]
    status, stopped, _ = _chat(server, {"messages": [{"role": "user", "content": "12+34=?"}], "max_tokens": 24,
                                        "temperature": 0, "stop": ["="], "logprobs": True, "top_logprobs": 0})
    choice = stopped["choices"][0]
    assert status == 200 and choice["message"]["content"] == "12+34" and choice["finish_reason"] == "stop"
    assert "".join(e["token"] for e in choice["logprobs"]["content"]) == "12+34"
    assert all(e["top_logprobs"] == [] for e in choice["logprobs"]["content"])


def test_concurrent_requests_are_serialised(server):
    results = []

    def ask():
        results.append(_chat(server, {"messages": [{"role": "user", "content": "3+4=?"}], "max_tokens": 12,
                                      "temperature": 0}))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 4
    assert len({r[1]["choices"][0]["message"]["content"] for r in results}) == 1


MSG = [{"role": "user", "content": "1+1=?"}]
BAD_REQUESTS = [
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 65}, "max_tokens"),
    ({"messages": MSG, "max_tokens": True}, "max_tokens"),
    ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MSG, "temperature": -0.1}, "temperature"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "n": 5}, "n"),
    ({"messages": MSG, "stop": 3}, "stop"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": MSG, "seed": -1}, "seed"),
    ({"messages": MSG, "logprobs": "yes"}, "logprobs"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 104}, "top_logprobs"),
    ({"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MSG, "stream": True}, "stream"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "9" * 250}], "max_tokens": 20}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_400(server, body, param):
    status, payload, _ = _chat(server, body)
    assert status == 400
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_content_parts_are_accepted(server):
    parts = [{"type": "text", "text": "12+"}, {"type": "text", "text": "34=?"}]
    status, body, _ = _chat(server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 24,
                                     "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == "12+34=46. #46"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_body_not_a_json_object_gets_400(server, raw):
    status, payload, _ = _request(server, "/v1/chat/completions", raw=raw, method="POST")
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"


def test_unknown_model_404(server):
    status, payload, _ = _chat(server, {"model": "gpt-9", "messages": MSG})
    assert status == 404 and payload["error"]["code"] == "model_not_found" and payload["error"]["param"] == "model"
    assert _request(server, "/v1/models/gpt-9")[0] == 404


def test_paths_and_methods(server):
    status, payload, _ = _request(server, "/v1/completions", {"prompt": "x"})
    assert status == 404 and "unknown path" in payload["error"]["message"]
    assert _request(server, "/nope")[0] == 404
    status, payload, headers = _request(server, "/v1/chat/completions")  # GET
    assert status == 405 and headers["Allow"] == "POST, OPTIONS"
    assert payload["error"]["message"] == "GET is not allowed on /v1/chat/completions; use POST"
    status, _, headers = _request(server, "/v1/models", {"x": 1})  # POST
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
    assert _request(server, "/v1/chat/completions", method="DELETE")[0] == 405
    assert _request(server, "/v1/models/")[1]["data"][0]["id"] == "tiny"  # a trailing slash is the same path


def _chunked(server, chunks: list[bytes], *, chunked: bool = True):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if chunked:
            conn.send(b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, json.load(response)
    finally:
        conn.close()


def test_size_limit_413_chunked_bodies_and_length_required_411(server):
    big = {"messages": [{"role": "user", "content": "1" * (MAX_BYTES + 10)}]}
    status, payload, _ = _chat(server, big)
    assert status == 413 and str(MAX_BYTES) in payload["error"]["message"]
    small = json.dumps({"messages": MSG, "max_tokens": 4}).encode()
    status, payload = _chunked(server, [small[:10], small[10:]])
    assert status == 200 and payload["object"] == "chat.completion"
    status, payload = _chunked(server, [b" " * 1000] * 5 + [small])  # bounded while it streams in
    assert status == 413 and str(MAX_BYTES) in payload["error"]["message"]
    status, payload = _chunked(server, [], chunked=False)  # neither Content-Length nor chunked
    assert status == 411 and "Content-Length" in payload["error"]["message"]
    assert _chat(server, {"messages": MSG, "max_tokens": 4})[0] == 200  # still serving


def test_cli_serve_arguments():
    from rlxf.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "tiny", "--port", "0", "--max-request-bytes", "10",
                                      "--max-tokens-limit", "8", "--max-top-logprobs", "50"])
    assert (args.command, args.port, args.max_request_bytes, args.max_tokens_limit, args.max_top_logprobs,
            args.host, args.device) == ("serve", 0, 10, 8, 50, "127.0.0.1", "auto")


def test_make_server_rejects_bad_limits():
    from rlxf.serve import make_server

    with pytest.raises(ValueError, match="max_request_bytes"):
        make_server("tiny", port=0, max_request_bytes=0)


# -- attacks ------------------------------------------------------------------------------------

def _raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body if body or method == "POST" else None,
                     {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


HOSTILE_BODIES = [  # (body, the param named or a phrase of the message)
    (json.dumps({"messages": MSG, "seed": 10**30}).encode(), "seed"),
    (json.dumps({"messages": MSG, "seed": 2**63}).encode(), "seed"),
    (json.dumps({"messages": MSG, "max_tokens": 10**30}).encode(), "max_tokens"),
    (json.dumps({"messages": MSG, "n": 10**30}).encode(), "n"),
    (json.dumps({"messages": MSG, "logprobs": True, "top_logprobs": 10**30}).encode(), "top_logprobs"),
    (json.dumps({"messages": MSG, "temperature": 10**400}).encode(), "temperature"),
    (b'{"messages": [{"role": "user", "content": "1+1=?"}], "temperature": 1e309}', "1e309 is beyond"),
    (b'{"messages": [{"role": "user", "content": "1+1=?"}], "temperature": NaN}', "NaN is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "1+1=?"}], "frequency_penalty": -Infinity}', "-Infinity is not"),
    (b'{"messages": [{"role": "user", "content": "1+1=?"}], "max_tokens": 1, "max_tokens": 60}', "appears twice"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}', "messages[0].content"),
    (b'{"model": ["tiny"], "messages": [{"role": "user", "content": "1+1=?"}]}', "model"),
    (b"[" * 2000 + b"]" * 2000, "nests arrays/objects 2000 deep"),
    (b'{"a":' * 600 + b"1" + b"}" * 600, "nests arrays/objects 600 deep"),
    (b"\xef\xbb\xbf" + json.dumps({"messages": MSG}).encode(), "not valid JSON"),
    (b"9" * 4000, "must be a JSON object, got an integer"),
    (b'"hi"', "must be a JSON object, got a string"),
    (b"", "not valid JSON"),
]


@pytest.mark.parametrize("raw,where", HOSTILE_BODIES, ids=[f"hostile-{i}" for i in range(len(HOSTILE_BODIES))])
def test_hostile_bodies_get_400(server, raw, where):
    status, _, data = _raw(server, "POST", "/v1/chat/completions", raw)
    assert status == 400, data[:300]
    error = json.loads(data)["error"]
    assert error["type"] == "invalid_request_error" and (error["param"] == where or where in error["message"])


def test_head_and_options(server):
    status, headers, data = _raw(server, "HEAD", "/v1/models")
    assert status == 200 and data == b"" and int(headers["Content-Length"]) > 0
    status, headers, data = _raw(server, "OPTIONS", "/v1/chat/completions")
    assert status == 204 and data == b"" and headers["Allow"] == "POST, OPTIONS"
    assert _raw(server, "OPTIONS", "/nope")[0] == 404


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1", ""])
def test_wrong_content_type_gets_415(server, content_type):
    status, _, data = _raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": MSG}).encode(),
                           {"Content-Type": content_type})
    assert status == 415 and "application/json" in json.loads(data)["error"]["message"]


@pytest.mark.slow
def test_256_concurrent_clients_all_get_200(server):
    n, host, port = 256, *server.server_address[:2]
    body = json.dumps({"messages": [{"role": "user", "content": "3+4=?"}], "max_tokens": 2,
                       "temperature": 0}).encode()
    barrier, results = threading.Barrier(n), [None] * n

    def client(i):
        try:
            barrier.wait(timeout=30)
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            results[i] = (response.status, json.load(response)["choices"][0]["message"]["content"])
            conn.close()
        except Exception as err:  # a reset or a timeout: reported below
            results[i] = repr(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    failures = [r for r in results if not isinstance(r, tuple) or r[0] != 200]
    assert not failures, f"{len(failures)} of {n} failed, e.g. {failures[:3]}"
    assert len({r[1] for r in results}) == 1


def test_seed_bounds(server):
    body = {"messages": MSG, "max_tokens": 2, "seed": 2**63 - 1}
    assert _chat(server, body)[0] == 200
    status, payload, _ = _chat(server, {**body, "seed": 2**63})
    assert status == 400 and payload["error"]["param"] == "seed" and "0..9223372036854775807" in payload["error"]["message"]


@pytest.mark.parametrize("headers", [{"Content-Length": str(10**9)},
                                     {"Content-Length": str(MAX_BYTES + 1), "Expect": "100-continue"}],
                         ids=["beyond-drain-limit", "expect-100-continue"])
def test_oversized_body_refused_before_it_is_sent(server, headers):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {"Content-Type": "application/json", **headers}.items():
        conn.putheader(name, value)
    conn.endheaders()  # and no body: the 413 comes without it
    response = conn.getresponse()
    assert response.status == 413 and response.headers["Connection"] == "close"
    assert str(MAX_BYTES) in json.load(response)["error"]["message"]
    conn.close()


def test_slow_body_gets_408(server, monkeypatch):
    import rlxf.serve

    monkeypatch.setattr(rlxf.serve, "BODY_TIMEOUT_S", 0.5)
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "100")
    conn.endheaders()
    conn.send(b'{"messages": ')  # and then nothing
    response = conn.getresponse()
    assert response.status == 408 and "0.5 s" in json.load(response)["error"]["message"]
    conn.close()


# -- API key and exposure ----------------------------------------------------------------------

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed_server(server):
    from rlxf.serve import make_server

    srv, thread = make_server("tiny", "127.0.0.1", 0, max_request_bytes=1_000_000, max_tokens_limit=64,
                              model=server.service.model, tokenizer=server.service.tokenizer, api_key=KEY)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {KEY}x", KEY, f"Basic {KEY}", "Bearer "])
def test_api_key_required(keyed_server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path, body in [("GET", "/v1/models", b""), ("POST", "/v1/chat/completions",
                                                           json.dumps({"messages": MSG}).encode()),
                               ("GET", "/nope", b""), ("OPTIONS", "/v1/models", b"")]:
        status, response_headers, data = _raw(keyed_server, method, path, body, headers)
        error = json.loads(data)["error"]
        assert status == 401 and response_headers["WWW-Authenticate"] == "Bearer", (method, path)
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


def test_api_key_accepted_and_health_open(keyed_server):
    import openai

    assert _raw(keyed_server, "GET", "/health")[0] == 200
    status, _, data = _raw(keyed_server, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert status == 200 and json.loads(data)["data"][0]["id"] == "tiny"
    reply = openai.OpenAI(base_url=keyed_server.base_url, api_key=KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "12+34=?"}], max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == "12+34=46. #46"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.base_url, api_key="wrong", max_retries=0).models.list()


def test_deep_nesting_100k_gets_400(keyed_server):
    raw = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, data = _raw(keyed_server, "POST", "/v1/chat/completions", raw, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and "nests arrays/objects" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("host,warns", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                        ("0.0.0.0", True), ("::", True), ("", True), ("192.0.2.7", True)])
def test_exposure_warning(host, warns):
    from rlxf.serve import exposure_warning

    message = exposure_warning(host, None)
    assert (message is not None) == warns and exposure_warning(host, KEY) is None
    if warns:
        assert "no API key" in message and "RLXF_API_KEY" in message and "127.0.0.1" in message


def test_make_server_warns_on_a_public_address_without_a_key(server, caplog):
    from rlxf.serve import make_server

    with caplog.at_level("WARNING", logger="rlxf.serve"):
        srv, thread = make_server("tiny", "0.0.0.0", 0, model=server.service.model,
                                  tokenizer=server.service.tokenizer)
    srv.shutdown()
    srv.server_close()
    assert any("listening on 0.0.0.0 with no API key" in r.getMessage() for r in caplog.records)


def test_make_server_rejects_bad_keys_and_a_busy_port(server):
    from rlxf.serve import make_server

    for key in ["", "has space", "ключ"]:
        with pytest.raises(ValueError, match="API key"):
            make_server("tiny", port=0, api_key=key)
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
        make_server("tiny", "127.0.0.1", server.server_address[1], model=server.service.model,
                    tokenizer=server.service.tokenizer)


def test_cli_api_key_from_flag_or_environment(monkeypatch):
    from rlxf.cli import _serve_api_key, build_parser

    parser = build_parser()
    monkeypatch.setenv("RLXF_API_KEY", "from-env")
    assert _serve_api_key(parser.parse_args(["serve"])) == "from-env"
    assert _serve_api_key(parser.parse_args(["serve", "--api-key", "from-flag"])) == "from-flag"
    monkeypatch.setenv("RLXF_API_KEY", "")
    assert _serve_api_key(parser.parse_args(["serve"])) is None


@pytest.mark.slow
def test_cli_serve_end_to_end():
    """`rlxf serve` in a process of its own: the exposure warning on stderr, a request, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RLXF_API_KEY"}
    # a pytest-xdist worker ignores SIGINT, and a child inherits that; Ctrl-C must reach the server
    proc = subprocess.Popen([sys.executable, "-m", "rlxf.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                             "--threads", "1", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()  # the startup line, once the server accepts connections
        assert "no API key" in line, line + proc.stderr.read()
        port = int(line.split("/v1")[0].rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in out
    assert "listening on 0.0.0.0 with no API key" in err and "RLXF_API_KEY" in err


MALFORMED_HTTP = {
    "not-http": b"\x00\x01\x02 hello\r\n\r\n",
    "length-and-chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "negative-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two-lengths": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "gzip-encoding": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "bad-chunk": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "non-ascii-path": b"GET /v1/models/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    "no-host": b"GET /health HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED_HTTP.values(), ids=MALFORMED_HTTP.keys())
def test_malformed_http_gets_4xx(server, raw):
    import socket

    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(raw)
        status_line = sock.recv(65536).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    assert _chat(server, {"messages": MSG, "max_tokens": 1})[0] == 200  # still serving


def test_server_answers_while_the_model_is_busy(server):
    gate = threading.Event()
    server.app.state.generator.submit(gate.wait, 30)  # hold the generation worker
    result = []
    waiting = threading.Thread(target=lambda: result.append(_chat(server, {"messages": MSG, "max_tokens": 2})))
    try:
        waiting.start()
        assert _request(server, "/health")[0] == 200 and _request(server, "/v1/models")[0] == 200
        assert _chat(server, {"messages": MSG, "max_tokens": 0})[0] == 400  # refused without the model
        assert waiting.is_alive() and not result  # the completion waits for the worker
    finally:
        gate.set()
    waiting.join(timeout=30)
    assert result[0][0] == 200
