"""Shared pytest fixtures (keep small; add yours below)."""

from __future__ import annotations

import base64
import os

import pytest
import torch

if not torch.cuda.is_available():  # before rlxf is imported: rlxf.rollout.kernels then run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs one worker per core) each worker keeps to one thread: the tiny
# models are bound by Python overhead, so a core per worker beats two workers fighting for both cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # for the runs the tests start in subprocesses


# `slow` for tests in files that carry no marks of their own. Entries are test names, or one case
# of a parametrized test ("name[id]"). Elsewhere `@pytest.mark.slow` sits on the test itself;
# docs/testing.md says what counts as slow.
SLOW_BY_FILE = {
    # torchrun subprocesses: 6-17 s apiece on a 2-core CPU
    "test_distributed.py": {
        "test_two_processes_give_the_one_process_run",
        "test_errors_stop_every_process_with_one_message",
        "test_grpo_on_two_processes_trains_with_identical_copies",
        "test_ppo_cooper_and_dapo_under_two_processes_give_the_one_process_run",
        "test_dynamic_sampling_draws_in_lockstep_when_each_process_samples",
    },
    # a run killed in a subprocess and resumed (10 s); end-to-end runs of 1-3 s each, kept out of the
    # quick subset so that it stays well under 3 minutes (the plain GRPO and DAPO presets stay in it)
    "test_grpo.py": {
        "test_resume_after_kill_equals_uninterrupted_run",
        "test_every_preset_runs_and_writes_the_run_files[dr_grpo-extra1]",
        "test_every_preset_runs_and_writes_the_run_files[rloo-extra3]",
        "test_every_preset_runs_and_writes_the_run_files[grpo-extra4]",
        "test_every_preset_runs_and_writes_the_run_files[grpo-extra5]",
        "test_every_preset_runs_and_writes_the_run_files[grpo-extra6]",
        "test_a_failing_user_reward_gives_none_that_is_counted",
        "test_dapo_dynamic_sampling_keeps_only_informative_groups",
        "test_share_prompt_trains_like_the_unshared_step",
        "test_share_prompt_runs_with_mini_batches_of_whole_groups",
    },
    "test_ppo.py": {"test_resume_after_kill_equals_uninterrupted_run"},
}


def pytest_collection_modifyitems(items):
    for item in items:
        names = SLOW_BY_FILE.get(item.path.name, ())
        if item.name in names or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)
    # Longest first: the learning runs (30-120 s each), then the other slow tests, then the rest, so
    # that pytest-xdist's workers end on short tests instead of one worker finishing a long run alone.
    items.sort(key=_start_order)


def _start_order(item) -> int:
    if item.get_closest_marker("slow") is None:
        return 2
    return 0 if item.path.name.startswith("test_learning") or "learns" in item.name else 1


# A valid 1 × 1 PNG: what report.png holds in tests that do not look at the figure (see below).
_ONE_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


@pytest.fixture(autouse=True)
def _one_pixel_report_png(request, monkeypatch):
    """Every training run renders report.png with matplotlib (~0.9 s on a 2-core CPU, ~130 runs in
    the suite). Tests marked ``report`` render it for real (the report's own tests and each
    recipe's "writes the run files" test); the others, which train for what they assert, get a
    1-pixel PNG in its place, and report.html is written as usual."""
    if request.node.get_closest_marker("report") is None:
        monkeypatch.setattr("rlxf.reporting.report._plot_png", lambda rows, panels, title: _ONE_PIXEL_PNG)


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory):
    """Random-init Llama (hidden 64, 2 layers, vocab 103, tied) + the char tokenizer, in HF format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlxf.zoo.tokenizer import build_tokenizer

    config = LlamaConfig(
        vocab_size=103, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-random") / "model"
    model.save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def tokenizer():
    """A fresh copy of the embedded character tokenizer (vocab 103, pad 0, bos 1, eos 2)."""
    from rlxf.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


def _session_threads() -> int:
    import torch

    return torch.get_num_threads()


_DEFAULT_THREADS = _session_threads()  # read at start-up, before any test or fixture changes it


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Recipes given ``threads: 1`` (and some module fixtures) set torch's global thread count;
    put back the count the session started with after every test, so later (slow) tests keep
    every core."""
    import torch

    yield
    torch.set_num_threads(_DEFAULT_THREADS)


@pytest.fixture
def label_db(tmp_path):
    """Where a labeling test keeps its database: a SQLite file, or, with ``RLXF_LABEL_TEST_PG`` set to
    a PostgreSQL server URL (``postgresql+psycopg://user:pw@host:5432/postgres``), a fresh database
    on that server, dropped afterwards (docs/labeling.md, "Databases")."""
    server = os.environ.get("RLXF_LABEL_TEST_PG")
    if not server:
        yield str(tmp_path / "labels.db")
        return
    import uuid

    import sqlalchemy as sa

    name = f"rlxf_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny forwards (extra threads only add contention);
    a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
