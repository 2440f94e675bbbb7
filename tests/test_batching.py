"""Batching modes: padded, longest and packed batches, and micro-batches cut by tokens, give the
same losses, updates and metrics, and a packed example never attends to another."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_qwen2_config, toy_examples

from tuneoff.batching import (
    collate,
    collate_packed,
    epoch_batches,
    make_batch,
    packing_isolates,
    supervised_tokens,
)
from tuneoff.config import Config, ConfigError
from tuneoff.data import IGNORE, Example, tokenize_split
from tuneoff.loss import forward_loss
from tuneoff.model import prepare_model


def tiny_qwen2(attn: str = "sdpa", vocab: int = 768, seed: int = 0) -> torch.nn.Module:
    """attn "varlen": sdpa switched to tuneoff's per-example attention, as prepare_model does."""
    from transformers import Qwen2ForCausalLM

    from tuneoff.model import use_varlen_attention

    config = tiny_qwen2_config(
        vocab=vocab, attn_implementation="sdpa" if attn == "varlen" else attn
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if attn == "varlen":
        use_varlen_attention(model)
        assert model.config._attn_implementation == "tuneoff_varlen"
    return model


def test_packed_batch_layout():
    examples = toy_examples([5, 3, 4])
    batch = collate_packed(examples, pad_id=0, row_tokens=64)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    assert batch["input_ids"].shape == (1, 12)  # one row, no padding
    # longest first (first-fit decreasing); positions restart at 0 for each example
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    starts = [0, 5, 9]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    # the supervised tokens are exactly those of the padded batch
    assert supervised_tokens(batch["labels"]) == supervised_tokens(collate(examples, 0)["labels"])


def test_packed_rows_are_balanced_and_pad_as_own_segment():
    examples = toy_examples([7, 5, 4, 3])
    batch = collate_packed(examples, pad_id=0, row_tokens=10)
    # 19 tokens -> 2 rows; longest first into the shorter row: [7, 3] and [5, 4] + 1 padding
    assert batch["input_ids"].shape == (2, 10)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert batch["labels"][1, 9] == IGNORE
    assert supervised_tokens(batch["labels"]) == supervised_tokens(collate(examples, 0)["labels"])


def test_padded_mode_pads_to_max_seq_len():
    cfg = Config(max_seq_len=32, batching="padded")
    batch = make_batch(toy_examples([5, 9]), 0, cfg)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [5, 9]
    assert make_batch(toy_examples([5, 9]), 0, cfg, "longest")["input_ids"].shape == (2, 9)


def test_group_by_length_is_seeded_and_groups_lengths():
    lengths = [int(x) for x in torch.randint(1, 200, (400,), generator=torch.Generator())]
    grouped = epoch_batches(400, 4, seed=1, epoch=0, lengths=lengths)
    assert grouped == epoch_batches(400, 4, seed=1, epoch=0, lengths=lengths)
    assert grouped != epoch_batches(400, 4, seed=1, epoch=1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(400))

    def padding(batches):
        return sum(
            len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches
        )

    assert padding(grouped) < padding(epoch_batches(400, 4, seed=1, epoch=0)) / 4


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_examples_do_not_attend_to_each_other(attn):
    model = tiny_qwen2(attn).eval()
    examples = toy_examples([7, 5, 6])
    batch = collate_packed(examples, 0, row_tokens=64)
    order = batch["position_ids"][0].eq(0).nonzero().flatten().tolist() + [18]
    spans = [slice(a, b) for a, b in zip(order, order[1:])]  # rows laid out 7, 6, 5

    def logits(ids):
        return model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits

    with torch.no_grad():
        base = logits(batch["input_ids"])
        perturbed_ids = batch["input_ids"].clone()
        perturbed_ids[0, spans[1]] = (perturbed_ids[0, spans[1]] + 17) % 768
        perturbed = logits(perturbed_ids)
        alone = model(input_ids=batch["input_ids"][:, spans[2]], use_cache=False).logits
    assert torch.equal(base[0, spans[0]], perturbed[0, spans[0]])  # before the change
    assert torch.allclose(base[0, spans[2]], perturbed[0, spans[2]], atol=1e-6)  # after it
    assert not torch.allclose(base[0, spans[1]], perturbed[0, spans[1]], atol=1e-3)
    assert torch.allclose(base[0, spans[2]], alone[0], atol=1e-5)  # as if it were alone
    assert packing_isolates(model, "cpu")


class _DropsPositions(torch.nn.Module):
    """A model whose forward ignores position ids, like an attention without packing support."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_packing_falls_back_to_longest_when_attention_leaks(caplog):
    from tuneoff.train import choose_batching

    leaky = _DropsPositions(tiny_qwen2())
    assert not packing_isolates(leaky, "cpu")
    with caplog.at_level(logging.WARNING):
        cfg = choose_batching(leaky, Config(batching="packed"), "cpu")
    assert cfg.batching == "longest"
    assert choose_batching(tiny_qwen2(), Config(batching="packed"), "cpu").batching == "packed"


def _tiny_data(tokenizer, max_seq_len: int = 64):
    from tuneoff.embedded import generate_records

    cfg = Config(max_seq_len=max_seq_len)
    records = generate_records(80, seed=3)
    train, _ = tokenize_split(records[:64], tokenizer, cfg)
    val, _ = tokenize_split(records[64:], tokenizer, cfg)
    return {"train": train, "val": val, "test": val}


def _train_losses(tmp_path, data, pad_id, **keys) -> tuple[list[float], dict, torch.nn.Module]:
    from accelerate import Accelerator

    from tuneoff.train import train

    cfg = Config(
        method="full",
        max_seq_len=64,
        batch_size=4,
        grad_accum=2,
        epochs=1,
        max_steps=4,
        lr=1e-3,
        warmup_steps=0,
        save_checkpoints=False,
        **keys,
    )
    model = prepare_model(tiny_qwen2(vocab=768, seed=1), cfg)  # varlen attention when packed
    arm_dir = tmp_path / "-".join(f"{k}{v}" for k, v in keys.items())
    arm_dir.mkdir()
    summary = train(model, Accelerator(cpu=True), data, cfg, arm_dir, pad_id, resume=False)
    rows = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    val = next(r for r in rows if r["event"] == "eval")
    return losses, {**summary, "val": val}, model


def test_per_step_loss_parity_across_batching_modes(tmp_path):
    """The fast path (packed, chunked loss) and the reference (padded to max_seq_len, full
    logits) take the same optimizer steps at the same seed: equal losses, weights, metrics."""
    from transformers import AutoTokenizer

    from tuneoff.embedded import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    data = _tiny_data(tokenizer)
    pad = tokenizer.pad_token_id
    reference, ref_summary, ref_model = _train_losses(
        tmp_path, data, pad, batching="padded", loss_chunk_size=0
    )
    assert len(reference) == 4
    assert ref_summary["padding_fraction"] > 0.3  # really padded to 64
    for keys in (
        {"batching": "longest", "loss_chunk_size": 0},
        {"batching": "packed", "loss_chunk_size": 0},
        {"batching": "packed", "loss_chunk_size": 16},
        {"batching": "packed", "packed_attention": "mask", "loss_chunk_size": 0},
    ):
        losses, summary, model = _train_losses(tmp_path, data, pad, **keys)
        assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6), keys
        assert summary["batching"] == keys["batching"]
        assert summary["train_tokens"] == ref_summary["train_tokens"]
        assert summary["train_supervised_tokens"] == ref_summary["train_supervised_tokens"]
        for a, b in zip(model.parameters(), ref_model.parameters()):
            assert torch.allclose(a, b, atol=1e-5), keys
        for metric in ("loss", "token_accuracy", "supervised_tokens"):
            assert summary["val"][metric] == pytest.approx(ref_summary["val"][metric], rel=1e-5)
        if keys["batching"] == "packed":
            assert summary["padding_fraction"] < 0.1  # only at the ends of rows
        if keys == {"batching": "packed", "loss_chunk_size": 0}:
            assert model.config._attn_implementation == "tuneoff_varlen"
            assert summary["padding_fraction"] == 0  # one row per micro-batch


@pytest.mark.parametrize("batching", ["packed", "longest", "padded"])
def test_token_budget_cuts_each_step_into_bounded_micro_batches(batching):
    """`micro_batch_tokens`: each step's examples, in the same order, cut into micro-batches
    that occupy at most the budget (an example alone may not need cutting further)."""
    from tuneoff.batching import micro_batch_cost
    from tuneoff.train import epoch_windows

    gen = torch.Generator().manual_seed(2)
    lengths = [int(x) for x in torch.randint(5, 65, (50,), generator=gen)]
    plain = Config(batch_size=4, grad_accum=3, max_seq_len=64, batching=batching)
    budget = plain.replace(micro_batch_tokens=150)
    by_count = epoch_windows(50, plain, 0, 0, 1, lengths)
    by_tokens = epoch_windows(50, budget, 0, 0, 1, lengths)
    assert len(by_count) == len(by_tokens) == 5  # the same optimizer steps
    sizes = set()
    for count_window, token_window in zip(by_count, by_tokens):
        assert [i for b, _ in token_window for i in b] == [i for b, _ in count_window for i in b]
        for micro, supervised in token_window:
            assert supervised
            assert micro_batch_cost([lengths[i] for i in micro], batching, 64) <= 150
            sizes.add(len(micro))
    assert len(sizes) > 1 if batching != "padded" else sizes == {2}  # 150 // 64 rows
    if batching == "packed":  # what CPU precision=auto weighs: the micro-batches' mean tokens
        from tuneoff.train import micro_batch_tokens

        examples = [Example([0] * n, [0] * n, False) for n in lengths]
        actual = [sum(lengths[i] for i in b) for w in by_tokens for b, _ in w]
        estimate = micro_batch_tokens(examples, budget)
        assert estimate == pytest.approx(sum(actual) / len(actual), rel=0.15)
    with pytest.raises(ConfigError, match="below max_seq_len"):
        plain.replace(micro_batch_tokens=63)


def test_token_budget_balances_micro_batches():
    """As few micro-batches as the budget allows, the largest as small as they allow; an
    example over the budget alone, its neighbours still within it."""
    from tuneoff.batching import split_by_tokens

    assert split_by_tokens([0, 1, 2, 3, 4], [100] * 5, 400, "packed", 256) == [[0, 1, 2], [3, 4]]
    assert split_by_tokens([0, 1, 2], [300, 200, 90], 256, "packed", 256) == [[0], [1], [2]]
    assert split_by_tokens([5, 3], [9, 9, 9, 9, 9, 9], 256, "padded", 100) == [[5, 3]]


def test_token_budget_takes_the_same_steps(tmp_path):
    """Micro-batches cut by tokens give the optimizer steps of micro-batches of batch_size:
    same losses and weights (the window's loss is normalized by its supervised tokens)."""
    from transformers import AutoTokenizer

    from tuneoff.embedded import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    data = _tiny_data(tokenizer)
    pad = tokenizer.pad_token_id
    reference, ref_summary, ref_model = _train_losses(tmp_path, data, pad, batching="packed")
    losses, summary, model = _train_losses(
        tmp_path, data, pad, batching="packed", micro_batch_tokens=100
    )
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert summary["train_supervised_tokens"] == ref_summary["train_supervised_tokens"]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_eval_metrics_unchanged_across_batching_modes():
    from tuneoff.evaluate import evaluate

    model = tiny_qwen2(seed=2)
    examples = toy_examples([9, 17, 4, 30, 12, 25, 8, 3])
    cfg = Config(max_seq_len=32)
    results = []
    for mode in ("padded", "longest", "packed"):
        for chunk in (0, 5):
            batches = [make_batch(examples[i : i + 4], 0, cfg, mode) for i in (0, 4)]
            results.append(evaluate(model, batches, "cpu", chunk))
    for r in results[1:]:
        for metric in ("loss", "token_accuracy", "supervised_tokens", "tokens"):
            assert r[metric] == pytest.approx(results[0][metric], rel=1e-5), metric


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_gradients_equal_padded_gradients(attn):
    model = tiny_qwen2(attn, seed=4)
    examples = toy_examples([11, 6, 20, 14])

    def grads(batch):
        model.zero_grad()
        forward_loss(model, batch, 0).backward()
        return [p.grad.clone() for p in model.parameters()]

    padded = grads(collate(examples, 0))
    packed = grads(collate_packed(examples, 0, 64))
    for a, b in zip(padded, packed):
        assert torch.allclose(a, b, atol=1e-5)
    if attn == "varlen":  # two rows, the shorter ending in a padding segment
        two_rows = grads(collate_packed(examples, 0, 26))
        for a, b in zip(padded, two_rows):
            assert torch.allclose(a, b, atol=1e-5)


def test_equal_counts_top_up_every_process_with_unsupervised_copies_only():
    """Under FSDP every process runs as many micro-batches per window as the one with the most
    (each forward is a collective); what each trains on is unchanged."""
    from tuneoff.train import epoch_windows

    gen = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(5, 65, (50,), generator=gen)]
    cfg = Config(batch_size=8, grad_accum=1, max_seq_len=64, micro_batch_tokens=128)
    for rank in range(2):
        plain = epoch_windows(50, cfg, 0, rank, 2, lengths)
        equal = epoch_windows(50, cfg, 0, rank, 2, lengths, equal_counts=True)
        other = epoch_windows(50, cfg, 0, 1 - rank, 2, lengths, equal_counts=True)
        assert [len(w) for w in equal] == [len(w) for w in other]
        assert any(
            len(a) != len(b) for a, b in zip(plain, epoch_windows(50, cfg, 0, 1 - rank, 2, lengths))
        )
        for p, e in zip(plain, equal):
            assert [m for m in e if m[1]] == [m for m in p if m[1]]
