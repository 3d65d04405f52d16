"""Labels per second and latency of ``rlxf label serve`` under concurrent API clients (SQLite, loopback).

    python benchmarks/label_load.py [--clients 50 --labels 20 --overlap 1 --out DIR]

Creates a fresh SQLite labeling database with ``--clients`` labelers and ``clients × labels /
overlap`` compare items, starts ``rlxf label serve`` on it in a process of its own (a free loopback
port), then runs ``--clients`` API clients at once (asyncio, one keep-alive HTTP/1.1 connection
each, ``Authorization: Bearer``): each loops ``GET /api/next`` → ``POST /api/label`` until no item
is left. Reports labels stored per second over the wall time, latency p50/p99/max of each endpoint
(send to last byte), errors (any status but 200, a reset or a timeout), and checks afterwards in
the database that every item holds exactly ``--overlap`` labels (none lost, none doubled). On
Linux it records the CPU seconds of the server, the clients and every other process, so a run on a
shared machine says how shared it was. ``--out`` writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_latency import (_cpu_seconds, _cpu_share, _machine, _ms, _percentile, _response,  # noqa: E402
                           _write_results)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50, help="concurrent API clients, one labeler each")
    p.add_argument("--labels", type=int, default=20, help="labels each client makes")
    p.add_argument("--overlap", type=int, default=1, help="labelers per item")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)

    machine = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "labels.db")
        tokens = _prepare(db, args)
        server, url = _start_server(db)
        try:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            before = _cpu_seconds(server.pid)
            level = asyncio.run(_run(host, int(port), tokens, args))
            level.update(_cpu_share(before, _cpu_seconds(server.pid)))
        finally:
            server.terminate()
            server.wait(timeout=60)
        level.update(_check(db, args))
    result = {"machine": machine, "command": "python benchmarks/label_load.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "settings": {"clients": args.clients, "labels_per_client": args.labels, "overlap": args.overlap,
                           "database": "SQLite file, WAL, synchronous=FULL"},
              "result": level}
    _write_results(result, _markdown(result), args.out)
    return result


def _prepare(db: str, args) -> list[str]:
    from rlxf.labeling.accounts import add_user
    from rlxf.labeling.items import push_items
    from rlxf.labeling.schema import open_engine

    engine = open_engine(db)
    tokens = [add_user(engine, f"labeler{i}") for i in range(args.clients)]
    n_items = args.clients * args.labels // args.overlap
    rng = random.Random(0)
    push_items(engine, "default", [{"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=? (item {i})",
                                    "completions": [f"answer {rng.randint(0, 200)}", f"answer {rng.randint(0, 200)}"]}
                                   for i in range(n_items)], overlap=args.overlap)
    engine.dispose()
    return tokens


def _start_server(db: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "rlxf", "label", "serve", "--db", db, "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    line = proc.stdout.readline()
    if not line.startswith("rlxf label serve: http://"):
        proc.kill()
        raise SystemExit(f"label_load: the server did not start (its output: {line!r})")
    return proc, line.split()[3].rstrip("/")


async def _run(host: str, port: int, tokens: list[str], args) -> dict:
    latencies: dict[str, list[float]] = {"next": [], "label": []}
    counts = Counter()
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, port, token, latencies, counts, args.timeout) for token in tokens))
    wall = time.perf_counter() - start
    row = {"labels": counts["labels"], "errors": counts["errors"], "wall_s": round(wall, 2),
           "labels_per_s": round(counts["labels"] / wall, 1)}
    for name, values in latencies.items():
        values.sort()
        row.update({f"{name}_p50_ms": _ms(_percentile(values, 0.5)), f"{name}_p99_ms": _ms(_percentile(values, 0.99)),
                    f"{name}_max_ms": _ms(values[-1] if values else None)})
    return row


async def _client(host: str, port: int, token: str, latencies: dict, counts: Counter, timeout: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)

    async def call(method: bytes, path: bytes, body: bytes = b"") -> tuple[int, dict]:
        writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (method, path, host.encode(), token.encode(), len(body), body))
        status, payload = await asyncio.wait_for(_response(reader), timeout)
        return status, json.loads(payload)

    try:
        while True:
            sent = time.perf_counter()
            status, item = await call(b"GET", b"/api/next")
            latencies["next"].append(time.perf_counter() - sent)
            if status != 200:
                counts["errors"] += 1
                continue
            if item["id"] is None:
                return
            sent = time.perf_counter()
            status, _ = await call(b"POST", b"/api/label", json.dumps({"id": item["id"], "choice": 0}).encode())
            latencies["label"].append(time.perf_counter() - sent)
            counts["labels" if status == 200 else "errors"] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        counts["errors"] += 1
    finally:
        writer.close()


def _check(db: str, args) -> dict:
    from rlxf.labeling.report import label_rows
    from rlxf.labeling.schema import open_engine

    engine = open_engine(db)
    rows = label_rows(engine)
    engine.dispose()
    per_item = Counter(r["item_id"] for r in rows)
    return {"stored_labels": len(rows), "items_with_overlap_labels": sum(v == args.overlap for v in per_item.values()),
            "items": args.clients * args.labels // args.overlap,
            "doubled": len(rows) - len({(r["item_id"], r["labeler"]) for r in rows})}


def _markdown(result: dict) -> str:
    m, s, r = result["machine"], result["settings"], result["result"]
    cpu = (f"{r['server_cpu_s']} / {r['client_cpu_s']} / {r['other_processes_cpu_s']}" if "server_cpu_s" in r
           else "n/a")
    return "\n".join([
        f"# rlxf label serve load — {m['cores']}-core CPU ({m['cpu']}), {result['date']}", "",
        f"`{result['command']}` · {s['clients']} concurrent API clients × {s['labels_per_client']} labels, overlap "
        f"{s['overlap']} · {s['database']} · client and server on the same machine · load average at start "
        f"{m['load_average_at_start']} · Python {m['python']}", "",
        "| labels stored | labels/s | errors | GET /api/next p50 / p99 / max ms | POST /api/label p50 / p99 / max ms "
        "| wall s | CPU s: server / clients / other processes |",
        "|---|---|---|---|---|---|---|",
        f"| {r['stored_labels']} | {r['labels_per_s']} | {r['errors']} | {r['next_p50_ms']} / {r['next_p99_ms']} / "
        f"{r['next_max_ms']} | {r['label_p50_ms']} / {r['label_p99_ms']} / {r['label_max_ms']} | {r['wall_s']} | {cpu} |",
        "",
        f"Check in the database afterwards: {r['items_with_overlap_labels']} of {r['items']} items hold exactly "
        f"{s['overlap']} label(s); {r['doubled']} doubled.", ""])


if __name__ == "__main__":
    main()
