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


def test_plain_openai_style_request(server):
    from rlxf.judges.local import LocalBackend, chat_prompt_ids

    service = server.RequestHandlerClass.service
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


def test_openai_client_if_installed(server):
    openai = pytest.importorskip("openai")
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
    assert status == 405 and headers["Allow"] == "POST" and payload["error"]["message"]
    status, _, headers = _request(server, "/v1/models", {"x": 1})  # POST
    assert status == 405 and headers["Allow"] == "GET"
    assert _request(server, "/v1/chat/completions", method="DELETE")[0] == 405


def test_size_limit_413_and_length_required_411(server):
    big = {"messages": [{"role": "user", "content": "1" * (MAX_BYTES + 10)}]}
    status, payload, _ = _chat(server, big)
    assert status == 413 and str(MAX_BYTES) in payload["error"]["message"]
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.load(response)["error"]["message"]
    conn.close()
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
