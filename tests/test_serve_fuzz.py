"""`rlxf serve` under arbitrary input (hypothesis): request parsing and the HTTP layer answer a 4xx,
never another exception or a 5xx. Bounded: every property runs at most 150 examples (about 20 s on
2 CPU cores, model load included)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rlxf.serve import (MAX_JSON_DEPTH, MAX_SEED, ChatRequest, RequestError, build_app, decode_json,
                        parse_request)

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = "sk-fuzz-key"
LIMITS = {"model_name": "tiny", "max_tokens_limit": 4, "max_n": 2, "max_top_logprobs": 5}
MSG = [{"role": "user", "content": "1+1=?"}]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.text(alphabet='[]{}"\\:,ab', max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
integers = st.integers(-3, 70) | st.sampled_from([2**63 - 1, 2**63, 10**30, -2**63, 10**400]) | json_values
numbers = (st.floats(-3, 3) | st.sampled_from([0, 1, 2, 1e309, -0.0, 10**400, math.nan, math.inf])
           | integers)
parts = st.lists(st.fixed_dictionaries({"type": st.just("text") | json_values,
                                        "text": st.text(max_size=10) | json_values}), max_size=3)
message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "robot"]) | json_values,
    "content": st.text(max_size=20) | parts | json_values})
requests = st.fixed_dictionaries({}, optional={
    "model": st.just("tiny") | json_values,
    "messages": st.lists(message, min_size=1, max_size=3) | json_values,
    "max_tokens": integers, "max_completion_tokens": integers, "n": integers, "seed": integers,
    "top_logprobs": integers, "temperature": numbers, "top_p": numbers,
    "logprobs": st.booleans() | json_values, "stream": st.booleans() | json_values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | json_values,
    "tools": json_values})
field_values = {"model": json_values, "messages": json_values, "max_tokens": integers,
                "max_completion_tokens": integers, "n": integers, "seed": integers, "top_logprobs": integers,
                "temperature": numbers, "top_p": numbers, "logprobs": json_values, "stream": json_values,
                "stop": json_values}
one_field = st.sampled_from(sorted(field_values)).flatmap(  # a valid request with one field drawn at random
    lambda name: field_values[name].map(lambda value: {"messages": MSG, "logprobs": True, name: value}))
bodies = requests | one_field | json_values


def _finite(value) -> bool:
    """True when ``value`` holds no NaN/infinite float (what strict JSON can carry)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@FUZZ
@given(bodies)
@example({"messages": MSG, "temperature": 10**400})
@example({"messages": MSG, "top_p": math.nan})
@example({"messages": MSG, "seed": 2**63})
@example({"messages": [{"role": "user", "content": "\ud800"}]})
def test_parse_request_gives_a_request_or_a_4xx(body):
    try:
        request = parse_request(body, **LIMITS)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
        json.dumps(err.body(), allow_nan=False)
        return
    assert isinstance(request, ChatRequest)
    assert request.max_tokens is None or 1 <= request.max_tokens <= 4
    assert 0 <= request.temperature <= 2 and 0 < request.top_p <= 1 and 1 <= request.n <= 2
    assert request.seed is None or 0 <= request.seed <= MAX_SEED
    assert 0 <= request.top_logprobs <= 5 and (request.logprobs or request.top_logprobs == 0)
    assert len(request.stop) <= 4 and all(isinstance(s, str) and s for s in request.stop)
    assert request.messages and all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                                    for m in request.messages)


@FUZZ
@given(json_values.filter(_finite))
def test_decode_json_reads_every_valid_json_document(value):
    raw = json.dumps(value).encode()
    if _depth(value) > MAX_JSON_DEPTH:
        with pytest.raises(RequestError):
            decode_json(raw)
    else:
        assert decode_json(raw) == value


@pytest.fixture(scope="module")
def clients():
    from starlette.testclient import TestClient

    from rlxf.models import load_policy, load_tokenizer
    from rlxf.serve import ChatService

    torch.set_num_threads(1)
    tokenizer = load_tokenizer("tiny")
    model = load_policy("tiny", device="cpu", resize_to=len(tokenizer))
    service = ChatService(model, tokenizer, **LIMITS)
    with TestClient(build_app(service, max_request_bytes=64_000)) as open_client, \
            TestClient(build_app(service, max_request_bytes=64_000, api_key=KEY)) as keyed_client:
        yield open_client, keyed_client


def _post(client, raw: bytes, content_type: str = "application/json", **headers):
    return client.post("/v1/chat/completions", content=raw, headers={"Content-Type": content_type, **headers})


def _check(response) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400 and response.request.method != "HEAD":
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"


@FUZZ
@given(st.binary(max_size=2000))
def test_http_arbitrary_bytes(clients, raw):
    _check(_post(clients[0], raw))


@FUZZ
@given(bodies.map(lambda body: json.dumps(body).encode()))
@example(b'{"messages": [{"role": "user", "content": "1+1=?"}], "seed": 1000000000000000000000000000000}')
@example(b'{"messages": [{"role": "user", "content": "1+1=?"}], "temperature": 1e309}')
def test_http_arbitrary_json_requests(clients, raw):
    response = _post(clients[0], raw)
    _check(response)
    if response.status_code == 200:
        reply = response.json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"


@settings(FUZZ, max_examples=50)
@given(st.integers(1, 3 * MAX_JSON_DEPTH), st.sampled_from(["[]", "{}"]))
@example(MAX_JSON_DEPTH - 1, "[]")
@example(MAX_JSON_DEPTH, "{}")
def test_http_nesting_limit(clients, depth, brackets):
    nested = brackets[0].replace("{", '{"a":') * depth + ("1" if brackets == "{}" else "") + brackets[1] * depth
    raw = b'{"messages": %s, "max_tokens": 1, "tools": %s}' % (json.dumps(MSG).encode(), nested.encode())
    status = _post(clients[0], raw).status_code
    assert status == (200 if depth + 1 <= MAX_JSON_DEPTH else 400)


methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
paths = (st.sampled_from(["/v1/models", "/v1/models/tiny", "/v1/models/x", "/v1/chat/completions", "/health",
                          "/", "/v1", "/v1/models/", "//", "/v1/chat/completions/"])
         | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%", max_size=30).map(lambda p: "/" + p))
header_values = st.text(alphabet=[chr(c) for c in range(0x20, 0x7f)], max_size=40)


@FUZZ
@given(methods, paths, header_values, header_values, st.binary(max_size=200))
def test_http_arbitrary_method_path_and_headers(clients, method, path, content_type, authorization, raw):
    for client in clients:
        response = client.request(method, path, content=raw if method not in ("GET", "HEAD") else None,
                                  headers={"Content-Type": content_type, "Authorization": authorization})
        _check(response)
        if client is clients[1] and path.rstrip("/") != "/health" and authorization.strip() != f"Bearer {KEY}":
            assert response.status_code == 401


@FUZZ
@given(header_values)
def test_http_content_types(clients, content_type):
    media_type = content_type.split(";")[0].strip().lower()
    status = _post(clients[0], json.dumps({"messages": MSG, "max_tokens": 1}).encode(), content_type).status_code
    assert status == 415 if media_type != "application/json" else status in (200, 415)
