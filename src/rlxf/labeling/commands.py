"""``rlxf label serve | add-user | push | export | stats``: the command line of the labeling app
(docs/labeling.md). Building the parser imports nothing heavy; each command imports what it uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "human labeling web app on a database: serve, add-user, push items, export labels (docs/labeling.md)"
DB_HELP = "the labeling database: a file path (SQLite) or a SQLAlchemy URL (default: labels.db)"


def add_parser(sub) -> None:
    p = sub.add_parser("label", help=HELP, description=f"rlxf label: {HELP}.", allow_abbrev=False)
    commands = p.add_subparsers(dest="label_command", metavar="LABEL_COMMAND")
    serve = commands.add_parser("serve", help="run the labeling web app", allow_abbrev=False)
    serve.add_argument("--db", default="labels.db", help=DB_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                       "only; put a TLS proxy in front for other machines)")
    serve.add_argument("--port", type=int, default=8100, help="port (default: 8100; 0 picks a free one)")
    serve.add_argument("--max-request-bytes", type=int, default=256 * 1024,
                       help="largest label/login body; larger gets 413 (default: 262144)")
    serve.add_argument("--max-push-bytes", type=int, default=32 * 1024 * 1024,
                       help="largest POST /api/owner/items body (default: 33554432)")
    serve.add_argument("--secure-cookies", action="store_true", help="mark the session cookie Secure even when "
                       "the app sees plain HTTP (behind a TLS proxy)")
    user = commands.add_parser("add-user", help="create a user (or renew its token); prints the token last",
                               allow_abbrev=False)
    user.add_argument("name", help="user name: letters, digits, '_', '.', '-'")
    user.add_argument("--db", default="labels.db", help=DB_HELP)
    user.add_argument("--role", choices=("labeler", "owner"), help="default: labeler for a new user; an existing "
                      "user keeps its role")
    user.add_argument("--queue", action="append", metavar="QUEUE", help="queue the user labels (repeatable; "
                      "default: default)")
    _add_push_parser(commands)
    _add_export_parser(commands)
    stats = commands.add_parser("stats", help="per-queue and per-labeler counts, speed and Krippendorff's alpha",
                                allow_abbrev=False)
    stats.add_argument("--db", default="labels.db", help=DB_HELP)
    stats.add_argument("--queue", help="only this queue")


def _add_push_parser(commands) -> None:
    push = commands.add_parser("push", help="add items to a queue from a JSONL file or sampled from a model",
                               description="rlxf label push: rows {\"prompt\", \"completions\": [...]} (+ optional "
                               "key, condition/domain, priority, other fields) from --file, or sampled from --model "
                               "/ --from-run on --dataset.", allow_abbrev=False)
    push.add_argument("--db", help=DB_HELP + "; or use --server")
    push.add_argument("--server", metavar="URL", help="push through a running server (owner token in "
                      "RLXF_LABEL_TOKEN)")
    push.add_argument("--file", metavar="F.jsonl", help="rows to push")
    push.add_argument("--model", metavar="DIR", help="sample the completions from this model ('tiny', a directory "
                      "or a hub id)")
    push.add_argument("--from-run", metavar="DIR", help="sample from the final model of this finished rlxf run")
    push.add_argument("--dataset", help="prompts for --model/--from-run (any rlxf dataset spec, e.g. task:arithmetic)")
    push.add_argument("--n", type=int, default=2, help="completions per prompt when sampling (default: 2)")
    push.add_argument("--limit", type=int, default=32, help="prompts to sample (default: 32)")
    push.add_argument("--max-new-tokens", type=int, default=64, help="sampling length limit (default: 64)")
    push.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    push.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    push.add_argument("--device", default="auto", help="sampling device (default: auto)")
    push.add_argument("--reward-model", metavar="DIR", help="active selection: label first the items whose two best "
                      "completions this RM scores closest")
    push.add_argument("--queue", default="default", help="queue name (default: default)")
    push.add_argument("--kind", choices=("compare", "rate", "edit"), default="compare", help="default: compare")
    push.add_argument("--scale", choices=("thumbs", "1-7"), help="rate queues: thumbs (default) or 1-7")
    push.add_argument("--overlap", type=int, default=1, help="labelers per item (default: 1; 2+ gives agreement)")
    push.add_argument("--lease-seconds", type=float, default=600.0, help="how long an item handed out stays "
                      "reserved for its labeler (default: 600)")
    push.add_argument("--assign", action="append", metavar="USER", help="make USER a member of the queue (repeatable; "
                      "* = every labeler)")


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write the labels in the formats the recipes read",
                                 allow_abbrev=False)
    export.add_argument("--db", help=DB_HELP + "; or use --server")
    export.add_argument("--server", metavar="URL", help="export through a running server (owner token in "
                        "RLXF_LABEL_TOKEN)")
    export.add_argument("--format", required=True, choices=("pairs", "kto", "sft", "labels", "csv"),
                        help="pairs: prompt/chosen/rejected (rlxf dpo, rm); kto: prompt/completion/label; sft: "
                        "prompt/completion from edits; labels/csv: every field")
    export.add_argument("--output", required=True, metavar="FILE", help="where to write (JSONL, or CSV)")
    export.add_argument("--queue", help="only this queue")


def run(args) -> int:
    from rlxf.config import ConfigError
    from rlxf.labeling.accounts import LabelingError
    from rlxf.labeling.client import LabelSourceError
    from rlxf.labeling.schema import SchemaError
    from sqlalchemy.exc import SQLAlchemyError

    command = {"serve": _serve, "add-user": _add_user, "push": _push, "export": _export, "stats": _stats}
    if args.label_command not in command:
        raise ConfigError("rlxf label: give a command: serve, add-user, push, export or stats (rlxf label --help)")
    try:
        return command[args.label_command](args)
    except LabelingError as err:
        raise ConfigError(f"rlxf label {args.label_command}: {err.message}") from None
    except (LabelSourceError, SchemaError, ValueError) as err:
        raise ConfigError(f"rlxf label {args.label_command}: {err}") from None
    except SQLAlchemyError as err:  # the database cannot be reached or refused a statement
        raise ConfigError(f"rlxf label {args.label_command}: database error: {err}") from None


def _source(args):
    from rlxf.config import ConfigError
    from rlxf.labeling.client import connect

    if bool(args.db) == bool(args.server):
        raise ConfigError(f"rlxf label {args.label_command}: give --db (a database) or --server URL, one of them")
    return connect(args.server or args.db)


def _serve(args) -> int:
    from rlxf.labeling.app import build_app
    from rlxf.labeling.schema import open_engine
    from rlxf.labeling.server import warn_if_exposed
    from rlxf.runtime.http import listen, start_uvicorn

    engine = open_engine(args.db)
    app = build_app(engine, max_request_bytes=args.max_request_bytes, max_push_bytes=args.max_push_bytes,
                    secure_cookies=args.secure_cookies)
    sock = listen(args.host, args.port, what="rlxf label serve")
    warn_if_exposed(args.host)
    host, port = sock.getsockname()[:2]
    print(f"rlxf label serve: http://{f'[{host}]' if ':' in host else host}:{port}/ on {engine.url!r} "
          "(owner page: /owner; Ctrl-C stops)", flush=True)
    server, _ = start_uvicorn(app, sock, name="rlxf-label-serve", threaded=False)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.dispose()
    print("rlxf label serve: stopped")
    return 0


def _add_user(args) -> int:
    from rlxf.labeling.accounts import add_user
    from rlxf.labeling.schema import open_engine

    engine = open_engine(args.db)
    token = add_user(engine, args.name, role=args.role, queue_names=tuple(args.queue or ("default",)))
    engine.dispose()
    print(f"rlxf label add-user: {args.name!r} in queue(s) {', '.join(args.queue or ['default'])}. "
          "The token is shown once; it logs in at the server's page or as 'Authorization: Bearer TOKEN'.")
    print(f"token: {token}")
    return 0


def _push(args) -> int:
    from rlxf.config import ConfigError

    sources = [s for s in (args.file, args.model, args.from_run) if s]
    if len(sources) != 1:
        raise ConfigError("rlxf label push: give one of --file F.jsonl, --model DIR or --from-run DIR")
    if args.file:
        rows = _read_jsonl(args.file)
    else:
        from rlxf.labeling.sample import run_model, sample_items

        if not args.dataset:
            raise ConfigError("rlxf label push: --model/--from-run need --dataset (e.g. task:arithmetic)")
        rows = sample_items(args.model or run_model(args.from_run), args.dataset, n=args.n, limit=args.limit,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                            device=args.device, reward_model=args.reward_model)
    client = _source(args)
    result = client.push(args.queue, rows, kind=args.kind, scale=args.scale or "", overlap=args.overlap,
                         lease_seconds=args.lease_seconds, assign=tuple(args.assign or ()))
    client.close()
    print(f"rlxf label push: queue {args.queue!r}: {result['added']} added, {result['updated']} updated (new "
          f"version), {result['unchanged']} unchanged")
    return 0


def _read_jsonl(path: str) -> list:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --file {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err}); one JSON object per line") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _export(args) -> int:
    from rlxf.labeling.report import export_rows, to_csv

    client = _source(args)
    rows = client.labels(args.queue)
    client.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "csv":
        out.write_text(to_csv(rows), encoding="utf-8")
        written = len(rows)
    else:
        converted = export_rows(rows, args.format)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in converted), encoding="utf-8")
        written = len(converted)
    print(f"rlxf label export: {written} {args.format} rows from {len(rows)} labels -> {out}")
    return 0


def _stats(args) -> int:
    from rlxf.labeling.report import queue_stats
    from rlxf.labeling.schema import open_engine

    engine = open_engine(args.db)
    stats = queue_stats(engine, args.queue)
    engine.dispose()
    for q in stats:
        alpha = "n/a" if q["alpha"] is None else f"{q['alpha']:.3f} ({q['alpha_metric']}, {q['alpha_items']} items)"
        print(f"{q['queue']}: {q['kind']}{' ' + q['scale'] if q['scale'] else ''}, {q['items']} items, "
              f"{q['complete']} complete, {q['labels']} labels, Krippendorff's alpha {alpha}")
        for who in q["labelers"]:
            speed = "" if who["median_seconds"] is None else f", median {who['median_seconds']:.1f} s/label"
            print(f"  {who['name']}: {who['labels']} labels{speed}")
    sys.stdout.flush()
    return 0
