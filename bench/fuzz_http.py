"""A bounded fuzz of deltaserve's HTTP surface: the OpenAI routes, the admin routes and /metrics.

Requests are drawn by Hypothesis: mostly valid bodies with a few fields replaced by hostile values
(2**64, NaN, lone surrogates, wrong types, thousands of stop strings, unsupported OpenAI fields,
unknown keys), raw non-JSON bodies, odd task names and keys. They go one after another over one
keep-alive connection. The server passes when no answer is a 5xx, every 4xx body is in OpenAI's
error shape, every stream ends with `[DONE]`, and no connection is reset or closed under a request.

    .venv/bin/python bench/fuzz_http.py --requests 20000           # spawns a tiny-model server
    .venv/bin/python bench/fuzz_http.py --url http://127.0.0.1:8000 --admin-key KEY --api-key KEY2

The tests run the same fuzz for a bounded number of requests (tests/server/test_fuzz_http.py).
Results: bench/results/fuzz_http.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # run as a script: bench/kernels.py would shadow the `kernels` package

from bench.measure import RESULTS  # noqa: E402  (importable only once the root leads sys.path, above)

TASK = "fuzz-task"
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "best_of",
    "audio",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "store",
    "service_tier",
)
"""OpenAI fields the server refuses (400 unsupported_parameter)."""
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00", "ok\ud83d"])
EDGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
HEADER_VALUE = st.text(st.sampled_from([chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100))]), max_size=70).map(
    lambda text: text.encode("latin-1")
)
"""Bytes an HTTP/1.1 client can send as a header value (visible ASCII and obs-text)."""
EDGE_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 2.0000001])


@dataclass(frozen=True)
class Target:
    """The server under fuzz: its URL, base name and keys (None: the server has no keys)."""

    url: str
    base: str
    admin_key: str | None
    api_key: str | None


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, bytes]
    body: bytes | None = None


@dataclass
class Tally:
    """What the fuzz saw: counts by status, and the first few requests that broke a rule."""

    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    resets: int = 0
    closed: int = 0
    bad_shape: int = 0
    unfinished_streams: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.server_errors or self.resets or self.closed or self.bad_shape or self.unfinished_streams)

    def fail(self, kind: str, call: Call, detail: str) -> None:
        if len(self.failures) < 20:
            body = (call.body or b"")[:300].decode("utf-8", "backslashreplace")
            self.failures.append(
                {"kind": kind, "method": call.method, "path": call.path[:200], "body": body, "detail": detail[:500]}
            )


def junk() -> st.SearchStrategy[Any]:
    """A value of any JSON type, edge cases first."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), EDGE_INTS, st.floats(), EDGE_FLOATS, st.text(max_size=12), SURROGATES
    )
    return st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=2))


def some_text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=30), SURROGATES, st.builds(lambda a, s: a + s, st.text(max_size=8), SURROGATES))


def stops() -> st.SearchStrategy[Any]:
    many = st.builds(lambda n, size: ["x" * size] * n, st.integers(0, 2000), st.integers(1, 600))
    return st.one_of(some_text(), st.lists(some_text(), max_size=20), many)


def sampling_fields(base: str) -> dict[str, st.SearchStrategy[Any]]:
    small = st.one_of(st.integers(1, 6), EDGE_INTS)
    return {
        "model": st.one_of(st.sampled_from([base, TASK, f"{base}:{TASK}", "nope", "", f"{base}:"]), some_text()),
        "max_tokens": small,
        "temperature": st.one_of(st.floats(0, 2), EDGE_FLOATS),
        "top_p": st.floats(0, 1),
        "top_k": st.one_of(st.integers(-2, 100), EDGE_INTS),
        "seed": st.one_of(st.integers(-(2**65), 2**65), EDGE_INTS),
        "stop": stops(),
        "stop_token_ids": st.lists(st.one_of(st.integers(-2, 600), EDGE_INTS), max_size=80),
        "presence_penalty": st.floats(-3, 3),
        "frequency_penalty": st.floats(-3, 3),
        "n": small,
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": junk()}),
        "user": some_text(),
        "ignore_eos": st.booleans(),
        "return_token_ids": st.booleans(),
        "response_format": response_formats(),
        "logit_bias": logit_biases(),
        "guided_choice": st.lists(some_text(), max_size=3),
        "guided_regex": st.sampled_from(["[a-z]+", "(", "a{2,"]),
    }


def response_formats() -> st.SearchStrategy[Any]:
    """Valid, odd and broken response formats (small schemas: each compiles in milliseconds)."""
    schema = st.sampled_from(
        [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "string", "maxLength": 3},
            {"type": "bogus"},
            {"$ref": "#/nope"},
            {},
            [],
        ]
    )
    json_schema = st.fixed_dictionaries({"name": some_text(), "schema": schema}, optional={"strict": st.booleans()})
    return st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": json_schema}),
        junk(),
    )


def logit_biases() -> st.SearchStrategy[Any]:
    keys = st.one_of(st.integers(-5, 600).map(str), some_text())
    return st.one_of(st.dictionaries(keys, st.one_of(st.floats(-150, 150), EDGE_FLOATS, junk()), max_size=4), junk())


def chat_body(base: str) -> st.SearchStrategy[dict[str, Any]]:
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": some_text()})
    content = st.one_of(some_text(), st.lists(part, max_size=2), st.none())
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]), "content": content},
        optional={"name": some_text(), "tool_calls": junk()},
    )
    optional = sampling_fields(base) | {
        "max_completion_tokens": st.one_of(st.integers(1, 6), EDGE_INTS),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 25),
    }
    required = {
        "model": st.just(base),
        "messages": st.lists(message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 6),
    }
    return _mutated(required, optional)


def completion_body(base: str) -> st.SearchStrategy[dict[str, Any]]:
    prompt = st.one_of(
        some_text(),
        st.lists(st.one_of(st.integers(0, 600), EDGE_INTS), max_size=8),
        st.lists(some_text(), max_size=2),
        st.lists(st.lists(st.integers(0, 600), max_size=3), max_size=2),
    )
    optional = sampling_fields(base) | {
        "logprobs": st.one_of(st.integers(-1, 25), st.booleans()),
        "echo": st.booleans(),
        "suffix": some_text(),
        "prompt": prompt,
    }
    required = {"model": st.just(base), "prompt": st.just("hello"), "max_tokens": st.integers(1, 6)}
    return _mutated(required, optional)


def _mutated(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body, then optional fields set, some to junk, maybe an unsupported or unknown field."""
    wild = {name: st.one_of(strategy, junk()) for name, strategy in optional.items()}
    extras = st.dictionaries(
        st.one_of(st.sampled_from(UNSUPPORTED), st.text(max_size=10), SURROGATES), junk(), max_size=1
    )
    dropped = st.sets(st.sampled_from(sorted(required)), max_size=1)
    return st.builds(
        lambda body, changed, extra, drop: {k: v for k, v in (body | changed | extra).items() if k not in drop},
        st.fixed_dictionaries(required),
        st.fixed_dictionaries({}, optional=wild),
        extras,
        dropped,
    )


def task_names() -> st.SearchStrategy[str]:
    odd = ["nope", "../x", "a/b", "a:b", ".", "..", "x" * 65, "\ud800", "é", " ", "%2e%2e"]
    return st.one_of(st.sampled_from([TASK, *odd]), st.text(max_size=70), some_text())


def headers(target: Target) -> st.SearchStrategy[dict[str, bytes]]:
    keys = [k for k in (target.admin_key, target.api_key) if k]
    auth = st.sampled_from(
        [*(f"Bearer {k}".encode() for k in keys), b"", b"Bearer nope", b"Basic eA==", b"Bearer \xff\xfe"]
    )
    weighted_auth = st.one_of(*(st.just(f"Bearer {keys[0]}".encode()) for _ in range(3)), auth) if keys else auth
    return st.fixed_dictionaries(
        {"authorization": weighted_auth},
        optional={
            "x-task": st.one_of(st.sampled_from([b"", TASK.encode(), b"nope"]), HEADER_VALUE),
            "x-request-id": HEADER_VALUE,
        },
    )


def openai_calls(target: Target) -> st.SearchStrategy[Call]:
    json_headers = headers(target).map(lambda h: h | {"content-type": b"application/json"})
    chat = st.builds(
        lambda b, h: Call("POST", "/v1/chat/completions", h, _dumps(b)), chat_body(target.base), json_headers
    )
    completion = st.builds(
        lambda b, h: Call("POST", "/v1/completions", h, _dumps(b)), completion_body(target.base), json_headers
    )
    raw = st.builds(
        lambda path, body, h: Call("POST", path, h, body),
        st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        st.one_of(st.binary(max_size=64), junk().map(_dumps)),
        json_headers,
    )
    reads = st.builds(
        lambda path, h: Call("GET", path, h),
        st.sampled_from(["/v1/models", "/metrics", "/health", "/ready", "/v1/nothing"]),
        headers(target),
    )
    return st.one_of(chat, chat, completion, completion, raw, reads)


def admin_calls(target: Target) -> st.SearchStrategy[Call]:
    task = task_names().map(lambda name: quote(name.encode("utf-8", "surrogatepass"), safe=""))
    gets = st.builds(
        lambda t, tail, q: f"/admin/v1/tasks/{t}{tail}{q}",
        task,
        st.sampled_from(["", "/versions", "/artifact"]),
        st.sampled_from(["", "?version=1", "?version=0", "?version=x", f"?version={2**64}"]),
    )
    simple = st.one_of(
        gets,
        st.sampled_from(["/admin/v1/tasks", "/admin/v1/jobs", "/admin/v1/stats"]),
        st.text(max_size=40).map(lambda j: f"/admin/v1/jobs/{quote(j, safe='')}"),
    )
    query = st.sampled_from(["", "?method=impart&ratio=8", "?ratio=0.5", "?ratio=nan", "?method=x", f"?seed={2**70}"])
    writes = st.one_of(
        st.builds(
            lambda t, b: ("POST", f"/admin/v1/tasks/{t}/rollback", _dumps({"version": b})),
            task,
            st.one_of(st.integers(-2, 3), junk()),
        ),
        st.builds(lambda t: ("POST", f"/admin/v1/tasks/{t}/warm", None), task),
        st.builds(lambda t, b: ("PUT", f"/admin/v1/tasks/{t}/artifact", b), task, st.binary(max_size=64)),
        st.builds(
            lambda t, q, b: ("POST", f"/admin/v1/tasks/{t}/checkpoint{q}", b), task, query, st.binary(max_size=64)
        ),
        st.builds(lambda t: ("DELETE", f"/admin/v1/tasks/{t}", None), task.filter(lambda t: t != TASK)),
    )
    content_type = st.sampled_from(
        [b"application/json", b"multipart/form-data; boundary=x", b"application/octet-stream", b"text/plain"]
    )
    return st.one_of(
        st.builds(lambda path, h: Call("GET", path, h), simple, headers(target)),
        st.builds(
            lambda w, h, ct: Call(w[0], w[1], h | {"content-type": ct}, w[2]), writes, headers(target), content_type
        ),
    )


def _dumps(value: Any) -> bytes:
    """JSON as a hostile client writes it: NaN allowed, lone surrogates as \\ud800 escapes."""
    return json.dumps(value, allow_nan=True).encode()


def calls(target: Target) -> st.SearchStrategy[Call]:
    return st.one_of(openai_calls(target), openai_calls(target), admin_calls(target))


def check(client: httpx.Client, call: Call, tally: Tally) -> None:
    """Send one call and record every rule it breaks."""
    tally.requests += 1
    try:
        with client.stream(call.method, call.path, headers=call.headers, content=call.body) as reply:
            body = reply.read()
    except httpx.LocalProtocolError:
        raise  # the fuzzer drew a request HTTP/1.1 cannot carry: a bug here, not in the server
    except httpx.TransportError as exc:
        tally.resets += 1
        tally.fail("reset", call, repr(exc))
        return
    status = reply.status_code
    tally.statuses[str(status)] = tally.statuses.get(str(status), 0) + 1
    if status >= 500:
        tally.server_errors += 1
        tally.fail("5xx", call, body.decode("utf-8", "replace"))
    if status >= 400 and not _openai_error(body):
        tally.bad_shape += 1
        tally.fail("shape", call, body.decode("utf-8", "replace"))
    if reply.headers.get("connection", "").lower() == "close" and status != 413:
        tally.closed += 1
        tally.fail("closed", call, f"{status} with Connection: close")
    if status == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        _check_stream(body, call, tally)


def _check_stream(body: bytes, call: Call, tally: Tally) -> None:
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        tally.unfinished_streams += 1
        tally.fail("stream", call, body[-300:].decode("utf-8", "replace"))
    for event in events[:-1]:
        if event.startswith(b'{"error"'):
            tally.server_errors += 1
            tally.fail("stream-error", call, event.decode("utf-8", "replace"))


def _openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
        and isinstance(error["type"], str)
    )


def fuzz(target: Target, requests: int, fuzz_seed: int) -> Tally:
    """`requests` Hypothesis-drawn calls, sent in turn over one keep-alive connection."""
    tally = Tally()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=target.url, timeout=60, limits=limits) as client:

        @seed(fuzz_seed)
        @settings(
            max_examples=requests,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(calls(target))
        def run(call: Call) -> None:
            check(client, call, tally)

        started = time.perf_counter()
        run()
        tally.seconds = round(time.perf_counter() - started, 1)
    return tally


def publish_task(url: str, base: Path, work: Path, admin_key: str | None) -> None:
    """Publish one real ImPart artifact of a synthetic fine-tune as TASK."""
    from bench.load import make_artifacts

    artifact = make_artifacts(base, work, 1, ratio=8.0)[0]
    auth = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    httpx.put(
        f"{url}/admin/v1/tasks/{TASK}/artifact", content=artifact.read_bytes(), headers=auth, timeout=120
    ).raise_for_status()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="fuzz a running server (it must serve a task named fuzz-task)")
    parser.add_argument("--admin-key")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_http.json")
    return parser.parse_args(argv)


def spawn_and_fuzz(args: argparse.Namespace) -> Tally:
    from bench.load import spawned_server
    from server.model.synthetic import write_tiny

    admin, api = "fuzz-admin", "fuzz-api"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = write_tiny(work / "tiny", seed=0)
        env = {"DELTASERVE_ADMIN_KEYS": admin, "DELTASERVE_API_KEYS": json.dumps({api: [TASK]})}
        with spawned_server(base, work, 64 << 20, extra_env=env) as url:
            publish_task(url, base, work, admin)
            return fuzz(Target(url, "tiny", admin, api), args.requests, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        base = httpx.get(
            f"{args.url}/v1/models",
            headers={"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {},
            timeout=30,
        ).json()["data"][0]["id"]
        tally = fuzz(Target(args.url, base, args.admin_key, args.api_key), args.requests, args.seed)
    else:
        tally = spawn_and_fuzz(args)
    result = asdict(tally) | {
        "ok": tally.ok,
        "reproduce": "python bench/fuzz_http.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    print(f"results: {args.out}")
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
