"""KTO (rlxf.losses.kto, rlxf kto): float64 references, TRL's KTO numbers, unpaired data, a run end to end.

The learning test on the embedded tiny model is in test_learning.py.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.configs.kto import KTOConfig
from rlxf.data import DataError, collate_kto, unpair_rows, validate_rows
from rlxf.losses.kto import kto_loss, kto_reference_point


def random_examples(seed, batch=8):
    g = torch.Generator().manual_seed(seed)
    ref = -20 * torch.rand(batch, generator=g, dtype=torch.float64)
    logps = (ref + torch.randn(batch, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.rand(batch, generator=g) < 0.5
    labels[0], labels[1] = True, False  # both kinds present
    ref_kl = -20 * torch.rand(batch, generator=g, dtype=torch.float64)
    kl = ref_kl + 0.5 + 0.3 * torch.randn(batch, generator=g, dtype=torch.float64)
    return logps, ref, labels, kl, ref_kl


def reference_kto(logps, ref, labels, kl, ref_kl, beta, lam_d, lam_u):
    """The paper's loss term by term (Python floats): z_0 = max(0, mean KL), ℓ = λ_y − v(x, y)."""
    z0 = max(0.0, sum(a - b for a, b in zip(kl.tolist(), ref_kl.tolist())) / len(kl))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = []
    for lp, rp, desirable in zip(logps.tolist(), ref.tolist(), labels.tolist()):
        r = lp - rp
        out.append(lam_d - lam_d * sigmoid(beta * (r - z0)) if desirable else lam_u - lam_u * sigmoid(beta * (z0 - r)))
    return out, z0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,lam_d,lam_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (2.0, 1.0, 0.5)])
def test_kto_matches_the_paper_definition(seed, beta, lam_d, lam_u):
    logps, ref, labels, kl, ref_kl = random_examples(seed)
    z0 = kto_reference_point(kl, ref_kl)
    got = kto_loss(logps, ref, labels, z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    want, want_z0 = reference_kto(logps, ref, labels, kl, ref_kl, beta, lam_d, lam_u)
    assert z0.item() == pytest.approx(want_z0, abs=1e-12) and want_z0 > 0
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_reference_point_is_clamped_at_zero_and_detached():
    kl = torch.tensor([-3.0, -1.0], requires_grad=True)
    z0 = kto_reference_point(kl, torch.zeros(2))
    assert z0.item() == 0.0 and not z0.requires_grad
    assert kto_reference_point(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_hand_numbers_and_gradient():
    # r = 2, z_0 = 1, β = 0.5: desirable ℓ = 1 − σ(0.5), dℓ/d log π = −β σ(0.5) σ(−0.5)
    logps = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss = kto_loss(logps, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]), 1.0, beta=0.5)
    s = 1 / (1 + math.exp(-0.5))
    assert loss.tolist() == pytest.approx([1 - s, s])
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5 * s * (1 - s), 0.5 * s * (1 - s)])


def test_bad_inputs_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="bool tensor"):
        kto_loss(x, x, torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(x, torch.zeros(2), torch.ones(3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="beta > 0"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), 0.0, beta=0.0)


# -- TRL: KTOTrainer._compute_loss ---------------------------------------------------------------

def trl_kto_loss(logps, ref, labels, kl, ref_kl, *, beta, lam_d, lam_u):
    """TRL 1.16's KTO loss on given sequence log-probs (precomputed reference, evaluation mode).

    The stand-in model returns one "token" per row whose log-prob is the sequence log-prob, so TRL's
    sum over completion tokens gives it back; `_compute_kl_logps` returns the mismatched log-probs."""
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    n = logps.shape[0]
    outputs = SimpleNamespace(log_probs=logps[:, None], entropy=torch.zeros(n, 1), mean_logits=torch.zeros(n, 1))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=SimpleNamespace(device=torch.device("cpu"),
                                                                           gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: kl, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
        _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    batch = {"label": labels.clone(), "input_ids": torch.ones(n, 2, dtype=torch.long),
             "attention_mask": torch.ones(n, 2, dtype=torch.long), "completion_mask": torch.ones(n, 2, dtype=torch.long),
             "ref_logps": ref, "ref_KL_logps": ref_kl}
    model = lambda **kwargs: outputs  # noqa: E731
    return trl_kto.KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False), trainer._metrics["eval"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,lam_d,lam_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
@pytest.mark.parametrize("kl_shift", [0.5, -2.0])  # a positive reference point, and one clamped at 0
def test_kto_matches_trl(seed, beta, lam_d, lam_u, kl_shift):
    logps, ref, labels, kl, ref_kl = random_examples(seed)
    kl = ref_kl + kl_shift + 0.1 * (kl - ref_kl)
    theirs_leaf = logps.detach().clone().requires_grad_()
    theirs, metrics = trl_kto_loss(theirs_leaf, ref, labels, kl, ref_kl, beta=beta, lam_d=lam_d, lam_u=lam_u)
    ours = kto_loss(logps, ref, labels, kto_reference_point(kl, ref_kl), beta=beta, desirable_weight=lam_d,
                    undesirable_weight=lam_u).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert metrics["kl"][-1] == pytest.approx(kto_reference_point(kl, ref_kl).item(), abs=1e-12)
    (g_ours,), (g_theirs,) = torch.autograd.grad(ours, logps), torch.autograd.grad(theirs, theirs_leaf)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


# -- data -----------------------------------------------------------------------------------------

def test_unpaired_rows_and_pairs_are_read_and_split():
    rows = [{"prompt": "1+1=", "completion": "#2", "label": True, "labeler": "ann"},
            {"prompt": "2+2=", "completion": "#5", "label": False},
            {"prompt": "3+3=", "chosen": "#6", "rejected": "#7", "pair_kind": "correctness"}]
    valid, skipped = validate_rows(rows, kind="kto")
    out = unpair_rows(valid)
    assert skipped == 0 and [(r["prompt"], r["completion"], r["label"]) for r in out] == [
        ("1+1=", "#2", True), ("2+2=", "#5", False), ("3+3=", "#6", True), ("3+3=", "#7", False)]
    assert out[0]["labeler"] == "ann" and out[3]["pair_kind"] == "correctness"
    assert "pair_id" not in out[0] and out[2]["pair_id"] == out[3]["pair_id"] == 2


@pytest.mark.parametrize("row,match", [
    ({"prompt": "p", "completion": "c", "label": "true"}, "label' must be true or false"),
    ({"prompt": "p", "completion": "c", "label": 1}, "label' must be true or false"),
    ({"prompt": "p", "completion": "c"}, "field 'label' missing"),
    ({"prompt": "p", "label": True}, "field 'completion' missing"),
    ({"prompt": "p", "chosen": "c"}, "field 'rejected' missing"),
    (["p", "c", True], "must be an object with named fields"),
])
def test_bad_rows_name_the_problem(row, match):
    with pytest.raises(DataError, match=match):
        validate_rows([row], kind="kto")


def test_collate_pairs_each_prompt_with_the_previous_completion():
    examples = [{"prompt_ids": [1, 2], "completion_ids": [5], "label": True},
                {"prompt_ids": [3], "completion_ids": [6, 7], "label": False},
                {"prompt_ids": [4], "completion_ids": [8], "label": True}]
    batch = collate_kto(examples, pad_id=0)
    assert batch["label"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [[1, 2, 5], [3, 6, 7], [4, 8, 0]]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 8], [3, 5, 0], [4, 6, 7]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_config_checks():
    with pytest.raises(ConfigError, match="batch-size must be >= 2"):
        build_config(KTOConfig, {"batch_size": 1})
    with pytest.raises(ConfigError, match="both 0"):
        build_config(KTOConfig, {"desirable_weight": 0.0, "undesirable_weight": 0.0})


def test_kto_runs_on_an_unpaired_file_and_writes_the_run_files(tiny_random_model_dir, tmp_path):
    data = tmp_path / "labels.jsonl"
    rows = [{"prompt": f"{a}+{a}=", "completion": f"#{2 * a}" if a % 3 else f"#{2 * a + 1}", "label": a % 3 != 0}
            for a in range(1, 41)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    argv = ["kto", "--model", str(tiny_random_model_dir), "--dataset", str(data), "--eval-holdout", "0.2",
            "--max-steps", "2", "--batch-size", "4", "--progress", "false", "--log-every", "1", "--threads", "1",
            "--output-dir", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "kto" and summary["steps"] == 2
    assert summary["start/accuracy"] == pytest.approx(0.5)  # policy == reference: every reward ties
    assert summary["data"]["train_desirable"] > 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(key in train[-1] for key in ("loss", "kl", "accuracy"))
