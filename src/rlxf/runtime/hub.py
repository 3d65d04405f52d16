"""Whether a Hugging Face Hub id can be loaded on this machine, answered in a fraction of a second.

A model or dataset name that is not a local path is a Hub id. Loading one that is neither in the
local cache nor reachable makes ``transformers`` and ``datasets`` retry the network for tens of
seconds before they fail; :func:`hub_problem` answers first, from the cache directories, the
offline switches (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``) and one
short connection attempt to the Hub's host. It says nothing (None) whenever loading may work: the
id is cached, or the Hub answered, or a proxy is configured (the proxy decides, so the real loader
is left to try). Only the standard library is imported until a cache directory is needed.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

# "org/name" or "name" on the Hub; anything with "./", "~", "..", a leading "/" or a backslash is a path
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
OFFLINE_SWITCHES = {"model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                    "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
CONNECT_TIMEOUT = 3.0   # seconds for the one connection attempt to the Hub's host


class HubUnavailable(OSError):
    """A Hub id that can be neither read from the cache nor downloaded; the message says what to do."""


def is_hub_id(text: str) -> bool:
    """True when ``text`` has the form of a Hub id (``org/name`` or ``name``)."""
    return bool(HUB_ID.match(text))


def offline_switch(kind: str) -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or the other switch that is on for ``kind``), or None."""
    for name in OFFLINE_SWITCHES[kind]:
        value = os.environ.get(name, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return None


def hub_cache() -> Path:
    """The Hub's download cache: ``HF_HUB_CACHE``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cache_dirs(repo_id: str, kind: str) -> list[Path]:
    """Where a cached copy of ``repo_id`` would be: the Hub cache's ``models--org--name`` /
    ``datasets--org--name``, and for datasets the ``datasets`` library's ``org___name``."""
    flat = repo_id.replace("/", "--")
    dirs = [hub_cache() / f"{kind}s--{flat}"]
    if kind == "dataset":
        home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
        root = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
        name = repo_id.replace("/", "___")
        dirs += [root / name, root / name.lower()]
    return dirs


def is_cached(repo_id: str, kind: str) -> bool:
    """True when some cache directory of ``repo_id`` holds content (it may then load offline)."""
    for path in cache_dirs(repo_id, kind):
        snapshots = path / "snapshots"
        target = snapshots if snapshots.is_dir() else path
        if target.is_dir() and any(target.iterdir()):
            return True
    return False


def unreachable() -> str | None:
    """Why the Hub's host cannot be reached (one name lookup and TCP connection, at most about
    :data:`CONNECT_TIMEOUT` seconds), or None when it answered or a proxy decides."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {err.strerror or err}")

    worker = threading.Thread(target=attempt, daemon=True)   # a name lookup has no timeout of its own
    worker.start()
    worker.join(CONNECT_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {CONNECT_TIMEOUT:g} s"


def hub_problem(repo_id: str, kind: str, *, option: str, fix: str = "") -> str | None:
    """Why Hub id ``repo_id`` (``kind`` "model" or "dataset", given as ``option``) cannot be loaded
    here, with ``fix`` (what to do instead) appended; None when it may load."""
    if is_cached(repo_id, kind):
        return None
    switch = offline_switch(kind)
    if switch:
        why = f"switched off: {switch} is set; unset it to download"
    else:
        reason = unreachable()
        if reason is None:
            return None
        why = f"no network: {reason}"
    return (f"{option} {repo_id}: no local file or directory has this name, so it was treated as a Hugging Face "
            f"hub {kind}; the Hub is offline or unreachable ({why}) and the {kind} is not in the local cache "
            f"({cache_dirs(repo_id, kind)[0].parent}). {fix}").strip()


def model_fix(repo_id: str, option: str = "--model") -> str:
    """What to do about a model that cannot be loaded from the Hub."""
    tiny = ", or use the embedded model 'tiny' (--model tiny, nothing to download)" if option.endswith("model") else ""
    return (f"Download it on a machine with network access (`hf download {repo_id} --local-dir DIR`) and pass "
            f"--{option.lstrip('-').replace('_', '-')} DIR{tiny}.")
