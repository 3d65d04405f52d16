"""Wall time of every runnable-as-is line of the README's Quick usage, each on two pinned CPU cores.

Reads the ``[as is]`` command lines of README.md's "Quick usage" block (``rlxf demo`` added), runs
them with ``taskset`` on disjoint groups of ``--cores-per-run`` cores (as many at once as the
machine has groups), with CUDA hidden and as many torch threads as cores, and writes ``times.json``
and ``times.md`` (command, wall seconds, user + system CPU seconds, exit code, final held-out
accuracy where the run has one) under ``--out``. On a machine shared with other work the wall time
grows and the CPU seconds stay close to what the command costs alone.

    python benchmarks/cpu_times.py --out results/cpu-times [--timeout 560] [--skip cooper] [--cores-per-run 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(readme: Path) -> list[str]:
    """The ``rlxf ...`` lines of the Quick usage block marked ``[as is``, in order (no --help, no --resume)."""
    text = readme.read_text()
    block = text.split("## Quick usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        command = command.strip()
        if command.startswith("rlxf ") and "[as is" in comment and "--resume" not in command:
            commands.append((command, _upper_minutes(comment)))
    commands.sort(key=lambda pair: -pair[1])   # the longest first, so the whole set ends soonest
    return ["rlxf demo", *(c for c, _ in commands)]


def _upper_minutes(comment: str) -> float:
    """The upper end of the README's own estimate (``~15-25 min`` → 25), 0 when none."""
    found = re.search(r"~\s*(?:[\d.]+\s*-\s*)?([\d.]+)\s*min", comment)
    return float(found.group(1)) if found else 0.0


def to_argv(command: str) -> list[str]:
    """One shell line, each ``rlxf`` call run as ``python -m rlxf`` exactly as written."""
    parts = []
    for piece in command.split("&&"):
        words = shlex.split(piece)
        assert words[0] == "rlxf", command
        parts.append(shlex.join([sys.executable, "-m", "rlxf", *words[1:]]))
    return ["bash", "-c", " && ".join(parts)]


def workdir(run_dir: Path) -> Path:
    """A fresh working directory that sees the repository's configs/ and examples/ (runs write here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "examples"):
        link = run_dir / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    return run_dir


def final_accuracy(run_dir: Path) -> float | None:
    """The last run's final held-out accuracy (``final/task_accuracy`` or ``final/accuracy``)."""
    for summary in sorted(run_dir.rglob("summary.json"), reverse=True):
        data = json.loads(summary.read_text())
        for key in ("final/task_accuracy", "final/accuracy"):
            if isinstance(data.get(key), (int, float)):
                return data[key]
    return None


def _cpu_seconds(path: Path) -> float | None:
    """User + system CPU seconds of a command and the processes it waited for (``/usr/bin/time``)."""
    try:
        user, system = path.read_text().split()[-2:]
        return round(float(user) + float(system), 1)
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=560)
    ap.add_argument("--skip", action="append", default=[], help="skip commands containing this text")
    ap.add_argument("--work", default="/tmp/rlxf-cpu-times", help="where the runs write (kept out of --out)")
    ap.add_argument("--cores-per-run", type=int, default=2, help="cores pinned to each command (its torch threads)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    commands = [c for c in readme_commands(ROOT / "README.md") if not any(s in c for s in args.skip)]
    cores = sorted(os.sched_getaffinity(0))
    k = args.cores_per_run
    slots = [cores[i:i + k] for i in range(0, len(cores) - k + 1, k)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(k), "PYTHONPATH": str(ROOT / "src"),
           "TOKENIZERS_PARALLELISM": "false"}
    pending, running, results = list(enumerate(commands)), {}, {}
    start_all = time.time()
    while pending or running:
        while pending and len(running) < len(slots):
            index, command = pending.pop(0)
            slot = next(s for s in slots if tuple(s) not in {tuple(v[2]) for v in running.values()})
            run_dir = workdir(Path(args.work) / f"{index:02d}")
            log = open(out / f"log-{index:02d}.txt", "w")
            cmd = ["/usr/bin/time", "-o", str(out / f"cpu-{index:02d}.txt"), "-f", "%U %S",
                   "taskset", "-c", ",".join(map(str, slot)), *to_argv(command)]
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[index] = (proc, time.time(), slot, command, log)
        time.sleep(1)
        for index, (proc, started, slot, command, log) in list(running.items()):
            elapsed = time.time() - started
            if proc.poll() is None and elapsed < args.timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            results[index] = {"command": command, "seconds": round(elapsed, 1), "exit": proc.returncode,
                              "cpu_seconds": _cpu_seconds(out / f"cpu-{index:02d}.txt"),
                              "timed_out": elapsed >= args.timeout,
                              "final_accuracy": final_accuracy(Path(args.work) / f"{index:02d}")}
            print(json.dumps(results[index]), flush=True)
            del running[index]
    rows = [results[i] for i in sorted(results)]
    cpu = re.sub(r"\s+", " ", next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                                     if line.startswith("model name")), "?")).strip()
    meta = {"cpu": cpu, "cores_per_run": k, "torch_threads": k, "date": time.strftime("%Y-%m-%d"),
            "python": sys.version.split()[0], "wall_all": round(time.time() - start_all, 1)}
    (out / "times.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    lines = [f"CPU: {cpu}; each command pinned to {k} core(s) (taskset), {meta['date']}", "",
             "| command | wall s | CPU s | exit | final accuracy |", "|---|---|---|---|---|"]
    lines += [f"| `{r['command']}` | {'>' if r['timed_out'] else ''}{r['seconds']:.0f} | {r['cpu_seconds']} | {r['exit']} | "
              f"{r['final_accuracy'] if r['final_accuracy'] is not None else ''} |" for r in rows]
    (out / "times.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
