"""Loss, perplexity, token accuracy and bits per token against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tuneoff.data import IGNORE
from tuneoff.evaluate import evaluate, exact_match
from tuneoff.loss import forward_stats, loss_sum

# One sequence of 4 positions over a vocabulary of 3. Labels 1 and 2 are supervised; by the
# shift, logits at position 0 predict label[1] = 2 and logits at position 1 predict label[2] = 0.
LOGITS = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]]])
LABELS = torch.tensor([[IGNORE, 2, 0, IGNORE]])


def _nll(row: list[float], target: int) -> float:
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


HAND_LOSS = (_nll([0.0, 1.0, 2.0], 2) + _nll([3.0, 0.0, 0.0], 0)) / 2


class FixedLogits(torch.nn.Module):
    """A stand-in model that returns the same logits whatever the input."""

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=LOGITS.expand(input_ids.size(0), -1, -1))


def stats(labels: torch.Tensor) -> tuple[float, int, int]:
    """What evaluation computes for one batch of LOGITS (full-vocabulary logits)."""
    batch = {"input_ids": torch.zeros(labels.shape, dtype=torch.long), "labels": labels}
    return forward_stats(FixedLogits(), batch, 0)


def test_token_stats_matches_hand_computation():
    total, correct, tokens = stats(LABELS)
    assert tokens == 2
    assert total / tokens == pytest.approx(HAND_LOSS, abs=1e-6)
    assert correct == 2  # argmax(pos 0) = 2 = label[1]; argmax(pos 1) = 0 = label[2]


def test_unshifted_comparison_would_differ():
    # The reference's bug: comparing argmax at t with the label at t. Here it scores 0 of 2
    # (argmax at positions 1 and 2 are 0 and 2 against labels 2 and 0), the shift scores 2 of 2.
    unshifted = int((LOGITS.argmax(-1) == LABELS).sum())
    assert unshifted == 0 and stats(LABELS)[1] == 2


def test_loss_sum_is_differentiable_and_ignores_prompt():
    logits = LOGITS.clone().requires_grad_(True)
    loss_sum(logits, LABELS).backward()
    assert logits.grad[0, 2:].abs().sum() == 0  # positions 2, 3 predict ignored labels
    assert logits.grad[0, :2].abs().sum() > 0


def test_evaluate_reports_every_metric_from_the_hand_loss():
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": LABELS.expand(2, -1),
    }
    result = evaluate(FixedLogits(), [batch], "cpu")
    assert result["loss"] == pytest.approx(HAND_LOSS, abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(HAND_LOSS), rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(HAND_LOSS / math.log(2), rel=1e-6)
    assert result["token_accuracy"] == 1.0
    assert result["supervised_tokens"] == 4
    assert result["tokens"] == 7  # non-padding tokens only
    assert result["tokens_per_s"] > 0


def test_exact_match_strips_whitespace_only():
    records = [
        {"instruction": "a", "input": "", "output": "42"},
        {"instruction": "b", "input": "", "output": "Yes"},
    ]
    assert exact_match(records, [" 42\n", "yes"]) == 0.5


def test_the_first_evaluation_of_a_model_has_one_untimed_pass_and_the_same_metrics():
    """Start-up is kept out of eval tokens/s on every device, once per model and process."""
    model, calls = FixedLogits(), []
    model.register_forward_hook(lambda *_: calls.append(1))
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": LABELS}
    first = evaluate(model, [batch, batch], "cpu")
    assert len(calls) == 3  # the untimed pass and the two timed ones
    again = evaluate(model, [batch, batch], "cpu")
    assert len(calls) == 5
    assert first["loss"] == again["loss"] and first["tokens"] == again["tokens"] == 8


def test_each_of_several_processes_evaluates_its_share_and_as_many_forwards(monkeypatch):
    """Rank r of N takes batches r, r + N, ... and runs as many forwards as the rank with the
    most (the spare ones discarded); the shares add up to the whole (the sums are reduced)."""
    import tuneoff.evaluate as ev

    supervised = [LABELS, LABELS.clone(), torch.tensor([[IGNORE, 2, IGNORE, IGNORE]])]
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": y} for y in supervised]
    reference = FixedLogits()
    whole = evaluate(reference, batches, "cpu")
    monkeypatch.setattr(ev, "_sum_over_processes", lambda values, device: values)  # this share
    monkeypatch.setattr(ev, "_max_over_processes", lambda value, device: value)
    parts, models = [], []  # kept alive: a new model at a freed one's id counts as warmed
    for rank in (0, 1):
        monkeypatch.setattr(ev, "processes", lambda rank=rank: (rank, 2))
        model, calls = FixedLogits(), []
        models.append(model)
        model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        parts.append(evaluate(model, batches, "cpu"))
        assert len(calls) == 1 + 2  # the untimed pass, then 2 forwards: 2 batches, or 1 + spare
    assert parts[0]["supervised_tokens"] == 3 and parts[1]["supervised_tokens"] == 2
    for key in ("supervised_tokens", "tokens"):
        assert parts[0][key] + parts[1][key] == whole[key]
    loss = sum(p["loss"] * p["supervised_tokens"] for p in parts) / whole["supervised_tokens"]
    assert loss == pytest.approx(whole["loss"], rel=1e-12)
