"""Latency and throughput of ``rlxf serve`` under concurrent clients.

    python benchmarks/serve_latency.py [--model tiny --clients 64 256 --requests 4 --max-tokens 8
                                        --threads 1 --out DIR]

Starts the server in a process of its own (:func:`rlxf.serve.make_server`, what ``rlxf serve`` runs,
on a free loopback port, with ``--threads`` torch threads), then, for each ``--clients`` level, opens
that many keep-alive connections at once (asyncio, HTTP/1.1) and has each send ``--requests``
chat completions one after another (greedy, ``max_tokens`` = ``--max-tokens``, prompts ``a+b=?``).
Reports, per level: requests, errors (a reset, a timeout or any status but 200), latency p50/p99/max
(send to last byte, so it includes the wait behind the requests ahead: the server generates one
request at a time), requests/s and completion tokens/s over the wall time of the level. The client
runs on the same machine as the server, so on a small CPU machine the two share the cores. Before the
server starts, the same requests go through ``ChatService.complete`` in-process (no HTTP): the model's
own time per request. On Linux each level also records the CPU seconds that the server, the client
and every other process used, so a run on a shared machine says how shared it was. ``--out`` writes
``results.json`` and ``results.md`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[64, 256], help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)

    machine = _machine()
    in_process_ms = _in_process_ms(args)
    server, base = _start_server(args)
    try:
        host, port = base.removeprefix("http://").split("/")[0].rsplit(":", 1)
        asyncio.run(_level(host, int(port), clients=4, requests=2, args=args))  # warm-up, not reported
        rows = []
        for clients in args.clients:
            before = _cpu_seconds(server.pid)
            rows.append(asyncio.run(_level(host, int(port), clients=clients, requests=args.requests, args=args)))
            rows[-1].update(_cpu_share(before, _cpu_seconds(server.pid)))
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    result = {"machine": machine, "command": "python benchmarks/serve_latency.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "settings": {"model": args.model, "device": args.device, "requests_per_client": args.requests,
                           "max_tokens": args.max_tokens, "server_threads": args.threads},
              "in_process_ms_per_request": in_process_ms,
              "levels": rows}
    _write_results(result, _markdown(result), args.out)


def _write_results(result: dict, markdown: str, out: str | None) -> None:
    """Print ``markdown``; with ``out``, write ``results.json`` and ``results.md`` there."""
    print(markdown)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "results.md").write_text(markdown)


SERVER = """
import sys, torch
from rlxf.serve import make_server
torch.set_num_threads(int(sys.argv[3]))
server, thread = make_server(sys.argv[1], "127.0.0.1", 0, device=sys.argv[2], max_tokens_limit=int(sys.argv[4]))
print(server.base_url, flush=True)
sys.stdin.read()  # until the benchmark closes stdin
server.shutdown()
server.server_close()
"""


def _in_process_ms(args, requests: int = 64) -> float:
    """Milliseconds per request of ``ChatService.complete`` alone (no HTTP), one after another, with the
    server's thread count: the floor under the server's time per request."""
    import torch

    from rlxf.models import load_policy, load_tokenizer
    from rlxf.serve import ChatService

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    service = ChatService(load_policy(args.model, device=args.device, resize_to=len(tokenizer)), tokenizer,
                          model_name=args.model, max_tokens_limit=max(args.max_tokens, 1))
    rng = random.Random(0)
    bodies = [json.loads(_body(rng, args)) for _ in range(requests)]
    for body in bodies[:4]:  # warm-up
        service.complete(body)
    start = time.perf_counter()
    for body in bodies:
        service.complete(body)
    torch.set_num_threads(threads)
    return round((time.perf_counter() - start) / requests * 1000, 1)


def _start_server(args) -> tuple[subprocess.Popen, str]:
    """The server on a free loopback port, in a process of its own; returns the process and its base URL."""
    command = [sys.executable, "-c", SERVER, args.model, args.device, str(args.threads), str(max(args.max_tokens, 1))]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    line = proc.stdout.readline().strip()  # http://127.0.0.1:PORT/v1
    if not line.startswith("http://"):
        proc.kill()
        raise SystemExit(f"serve_latency: the server did not start (its output: {line!r})")
    return proc, line


async def _level(host: str, port: int, *, clients: int, requests: int, args) -> dict:
    rng = random.Random(clients)
    latencies: list[float] = []
    counts = {"errors": 0, "completion_tokens": 0}
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, port, [_body(rng, args) for _ in range(requests)], latencies,
                                   counts, args.timeout) for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    total = clients * requests
    return {"clients": clients, "requests": total, "errors": counts["errors"], "wall_s": round(wall, 2),
            "p50_ms": _ms(_percentile(latencies, 0.50)), "p99_ms": _ms(_percentile(latencies, 0.99)),
            "max_ms": _ms(latencies[-1] if latencies else None), "requests_per_s": round(len(latencies) / wall, 1),
            "completion_tokens_per_s": round(counts["completion_tokens"] / wall, 1)}


def _body(rng: random.Random, args) -> bytes:
    question = f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=?"
    return json.dumps({"model": args.model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": args.max_tokens, "temperature": 0}).encode()


async def _client(host: str, port: int, bodies: list[bytes], latencies: list[float], counts: dict,
                  timeout: float) -> None:
    """One keep-alive connection sending ``bodies`` in turn (reconnecting after an error)."""
    connection = None
    for body in bodies:
        sent = time.perf_counter()
        try:
            if connection is None:
                connection = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            reader, writer = connection
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            status, payload = await asyncio.wait_for(_response(reader), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            counts["errors"] += 1
            connection = None
            continue
        latencies.append(time.perf_counter() - sent)
        if status != 200:
            counts["errors"] += 1
            continue
        counts["completion_tokens"] += json.loads(payload)["usage"]["completion_tokens"]
    if connection is not None:
        connection[1].close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def _cpu_seconds(server_pid: int) -> dict | None:
    """CPU seconds so far: the whole machine (busy), the server process, this client process (Linux)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        server = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    client = os.times()
    return {"machine": busy / ticks, "server": (int(server[11]) + int(server[12])) / ticks,
            "client": client.user + client.system}


def _cpu_share(before: dict | None, after: dict | None) -> dict:
    """CPU seconds a level used: by the server, by this client, and by every other process."""
    if before is None or after is None:
        return {}
    used = {k: after[k] - before[k] for k in before}
    return {"server_cpu_s": round(used["server"], 1), "client_cpu_s": round(used["client"], 1),
            "other_processes_cpu_s": round(max(0.0, used["machine"] - used["server"] - used["client"]), 1)}


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# rlxf serve latency — {m['cores']}-core CPU ({m['cpu']}), {result['date']}", "",
             f"`{result['command']}` · model {s['model']} on {s['device']}, server torch threads "
             f"{s['server_threads']} · {s['requests_per_client']} requests per client, max_tokens "
             f"{s['max_tokens']}, greedy · client and server on the same machine · load average at start "
             f"{m['load_average_at_start']} · Python {m['python']}, torch {m['torch']}", "",
             f"The same requests through `ChatService.complete` in-process (no HTTP), one after another: "
             f"{result['in_process_ms_per_request']} ms per request.", "",
             "| concurrent clients | requests | errors | p50 ms | p99 ms | max ms | requests/s | completion tokens/s "
             "| wall s | CPU s: server / client / other processes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        cpu = (f"{r['server_cpu_s']} / {r['client_cpu_s']} / {r['other_processes_cpu_s']}" if "server_cpu_s" in r
               else "n/a")
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['max_ms']} | {r['requests_per_s']} | {r['completion_tokens_per_s']} | {r['wall_s']} | {cpu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
