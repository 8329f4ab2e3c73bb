"""The HTTP bridge (used by the tests and by `oneoff-audit local`): requests become API Gateway REST proxy
events exactly, proxy responses become HTTP responses exactly."""

from __future__ import annotations

import base64
import http.client
import json
import threading

import pytest

from oneoff_audit.api.httpbridge import build_event, serve

pytestmark = pytest.mark.integration

CLAIMS = {"sub": "u-1", "custom:audit_apps": "app1"}


def echo(event, context):
    if event["path"] == "/boom":
        raise RuntimeError("handler bug")
    if event["path"] == "/binary":
        return {"statusCode": 200, "headers": {"Content-Type": "application/octet-stream"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    if event["path"] == "/multi":
        return {"statusCode": 201, "headers": {"X-One": "a"}, "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"]},
                "body": "", "isBase64Encoded": False}
    return {"statusCode": 200, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"event": event, "request_id": context.aws_request_id})}


@pytest.fixture(scope="module")
def bridge():
    server = serve(echo, "127.0.0.1", 0, {"good-token": CLAIMS})
    yield server
    server.shutdown()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheaders(), data


def test_request_becomes_a_rest_proxy_event(bridge):
    status, _, data = request(bridge, "POST", "/apps/app1/sessions/S%201?limit=5&status=a&status=b&empty=&q=%E2%82%AC",
                              b'{"x": 1}', {"Authorization": "Bearer good-token", "X-Trace": "t1",
                                            "Content-Type": "application/json"})
    assert status == 200
    value = json.loads(data)
    event = value["event"]
    assert event["httpMethod"] == "POST"
    assert event["path"] == event["resource"] == "/apps/app1/sessions/S 1"
    assert event["queryStringParameters"] == {"limit": "5", "status": "b", "empty": "", "q": "\u20ac"}
    assert event["multiValueQueryStringParameters"] == {"limit": ["5"], "status": ["a", "b"], "empty": [""],
                                                       "q": ["\u20ac"]}
    assert event["pathParameters"] is None
    assert event["headers"]["X-Trace"] == "t1" and event["multiValueHeaders"]["X-Trace"] == ["t1"]
    assert (event["body"], event["isBase64Encoded"]) == ('{"x": 1}', False)
    context = event["requestContext"]
    assert context["authorizer"] == {"claims": CLAIMS}
    assert context["identity"]["sourceIp"] == "127.0.0.1"
    assert context["httpMethod"] == "POST" and context["stage"] == "local"
    assert context["requestId"] == value["request_id"] and len(context["requestId"]) == 36


def test_unknown_or_missing_token_reaches_the_handler_without_identity(bridge):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic good-token"}):
        event = json.loads(request(bridge, "GET", "/x", headers=headers)[2])["event"]
        assert "authorizer" not in event["requestContext"]
        assert event["queryStringParameters"] is None and event["multiValueQueryStringParameters"] is None
        assert event["body"] is None


def test_binary_bodies_both_ways(bridge):
    event = json.loads(request(bridge, "PUT", "/x", bytes(range(256)))[2])["event"]
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == bytes(range(256))
    status, headers, data = request(bridge, "GET", "/binary")
    assert (status, data) == (200, bytes(range(256)))
    assert ("Content-Length", "256") in headers


def test_headers_and_multi_value_headers_are_returned(bridge):
    status, headers, data = request(bridge, "GET", "/multi")
    assert (status, data) == (201, b"")
    assert [h for h in headers if h[0] in ("X-One", "Set-Cookie")] == [
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-One", "a")]


def test_a_failing_handler_is_a_502_like_api_gateway(bridge):
    assert request(bridge, "GET", "/boom")[::2] == (502, b'{"message":"Internal server error"}')


def test_concurrent_requests_are_served_one_handler_call_at_a_time():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(event, context):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.05)
        with lock:
            active[0] -= 1
        return {"statusCode": 200, "body": event["path"]}

    server = serve(slow, "127.0.0.1", 0, {})
    try:
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda n=n: results.append(request(server, "GET", f"/{n}")[2]))
                   for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [f"/{n}".encode() for n in range(6)]
        assert peak[0] == 1
    finally:
        server.shutdown()
    with pytest.raises(OSError):
        request(server, "GET", "/after-shutdown")


def test_static_files_beside_the_api(tmp_path):
    """The dashboard's files are served by wrapping the handler (local.with_dashboard), over the bridge."""
    from oneoff_audit.local import with_dashboard

    (tmp_path / "index.html").write_text("<h1>dashboard</h1>")
    (tmp_path / "app.js").write_text("console.log(1)")
    (tmp_path.parent / "secret.txt").write_text("no")
    server = serve(with_dashboard(echo, tmp_path), "127.0.0.1", 0, {})
    try:
        assert request(server, "GET", "/")[::2] == (200, b"<h1>dashboard</h1>")
        status, headers, data = request(server, "GET", "/static/app.js")
        assert (status, data) == (200, b"console.log(1)")
        assert dict(headers)["Content-Type"].split(";")[0] in ("text/javascript", "application/javascript")
        assert request(server, "GET", "/static/../secret.txt")[0] == 404
        assert request(server, "GET", "/static/%2e%2e/secret.txt")[0] == 404
        assert json.loads(request(server, "GET", "/apps/app1/sessions")[2])["event"]["path"] == "/apps/app1/sessions"
    finally:
        server.shutdown()


def test_build_event_is_usable_without_a_server():
    event = build_event("GET", "/apps/a/sessions?x=1", [("Authorization", "Bearer t")], b"", "10.0.0.1",
                        {"t": {"sub": "s"}}, request_id="req-1")
    assert event["requestContext"]["requestId"] == "req-1"
    assert event["requestContext"]["authorizer"] == {"claims": {"sub": "s"}}
