"""Batching: the same examples as padded rows (the reference), rows padded to the batch's
longest, or packed rows without padding, each giving the same summed loss over the same
supervised tokens; seeded epoch orders, optionally grouped by length; the packing probe.

Packed rows lay examples end to end with `position_ids` restarting at 0 for each one and no
attention mask: an attention that keeps examples apart by their position ids alone (varlen,
`attention.py`; transformers' sdpa with its block mask) never lets one see another, which
`packing_isolates` checks on the model itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tuneoff.config import Config
from tuneoff.data import IGNORE, Example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (`batching: longest`)."""
    return collate_padded(examples, pad_id, max(len(e.input_ids) for e in examples))


def collate_padded(examples: list[Example], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Right-pad every row to `width` (`batching: padded`, the reference: width = max_seq_len)."""
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(
    examples: list[Example], pad_id: int, row_tokens: int
) -> dict[str, torch.Tensor]:
    """Padding-free batch (`batching: packed`): the examples laid end to end in as few rows as
    hold them at about `row_tokens` each (one row whenever they fit), balanced by assigning the
    longest example first to the shortest row, with `position_ids` restarting at 0 for each
    example and no attention mask, from which the attention builds a block-diagonal causal mask:
    no example sees another. Each example's first label is IGNORE, so no token is predicted from
    the end of the previous example. Rows shorter than the longest end in padding that forms a
    segment of its own (position ids from 0, labels IGNORE): causal attention never lets an
    earlier token see it. Same summed loss as `collate`; padding only at the ends of rows."""
    total = sum(len(e.input_ids) for e in examples)
    rows: list[list[Example]] = [[] for _ in range(max(1, -(-total // row_tokens)))]
    fill = [0] * len(rows)
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):  # stable: ties keep batch order
        shortest = fill.index(min(fill))
        rows[shortest].append(e)
        fill[shortest] += len(e.input_ids)
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids, r_labels, r_pos = [], [], []
        for e in row:
            r_ids += e.input_ids
            r_labels += [IGNORE] + e.labels[1:]
            r_pos += range(len(e.input_ids))
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        positions.append(r_pos + list(range(pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


def packed_row_tokens(
    max_seq_len: int, hidden_size: int | None = None, varlen: bool = False
) -> int:
    """Target tokens per packed row. Under varlen attention (`attention.py`) an example's cost
    does not depend on its row, so one row holds the whole micro-batch: no padding at all.
    Under sdpa's block mask, attention runs over the whole row, about 4 * row * hidden FLOPs
    per token against about 24 * hidden^2 in the linear layers, so a row of hidden / 2 tokens
    costs about 8% extra, while longer rows leave less padding at row ends. Measured on CPU with
    the embedded model (hidden 128): rows of max_seq_len train 1.5x faster than rows of
    4 x max_seq_len. So: hidden / 2, at least max_seq_len (one example fits), at most
    4 x max_seq_len (a reference micro-batch of 4)."""
    if varlen:
        return 2**62
    if hidden_size is None:
        return 4 * max_seq_len
    return min(4 * max_seq_len, max(max_seq_len, hidden_size // 2))


def make_batch(
    examples: list[Example],
    pad_id: int,
    cfg: Config,
    batching: str | None = None,
    row_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch in the `batching` mode (default: the config's). Every mode gives the
    same summed loss over the same supervised tokens; only padding and speed differ."""
    batching = batching or cfg.batching
    if batching == "packed":
        return collate_packed(examples, pad_id, row_tokens or packed_row_tokens(cfg.max_seq_len))
    if batching == "padded":
        width = max(cfg.max_seq_len, *(len(e.input_ids) for e in examples))
        return collate_padded(examples, pad_id, width)
    return collate(examples, pad_id)


def micro_batch_cost(lengths: list[int], batching: str, max_seq_len: int) -> int:
    """Tokens a micro-batch of examples of these lengths occupies: their sum when packed,
    rows x the longest (padded to the longest) or rows x max_seq_len (padded)."""
    return _cost(len(lengths), sum(lengths), max(lengths), batching, max_seq_len)


def _cost(rows: int, total: int, longest: int, batching: str, max_seq_len: int) -> int:
    if batching == "packed":
        return total
    return rows * (longest if batching == "longest" else max(max_seq_len, longest))


def split_by_tokens(
    indices: list[int], lengths: list[int], budget: int, batching: str, max_seq_len: int
) -> list[list[int]]:
    """`indices` in order, cut into as few micro-batches as hold at most `budget` tokens each
    (`micro_batch_cost`; an example that alone exceeds it forms a micro-batch of its own),
    balanced: the largest is as small as that many allow, so that a step is not one full
    micro-batch and a small remainder."""

    def cut(cap: int) -> tuple[list[list[int]], int]:
        """The micro-batches under `cap`, and the largest one's cost (one pass, running sums)."""
        out: list[list[int]] = []
        rows = total = longest = largest = 0
        for i in indices:
            n = lengths[i]
            grown = _cost(rows + 1, total + n, max(longest, n), batching, max_seq_len)
            if out and grown <= cap:
                out[-1].append(i)
                rows, total, longest = rows + 1, total + n, max(longest, n)
            else:
                out.append([i])
                rows, total, longest = 1, n, n
                grown = _cost(1, n, n, batching, max_seq_len)
            largest = max(largest, grown)
        return out, largest

    fewest, largest = cut(budget)
    if len(fewest) < 2:
        return fewest
    high = min(budget, largest)
    single = max(_cost(1, lengths[i], lengths[i], batching, max_seq_len) for i in indices)
    low = min(high, single)
    while low < high:  # the smallest cap that needs no more micro-batches
        mid = (low + high) // 2
        if len(cut(mid)[0]) <= len(fewest):
            high = mid
        else:
            low = mid + 1
    return cut(low)[0]


def epoch_batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) only, so every arm and
    every resumed run sees the same order. The last, smaller batch is kept.

    With `lengths` (group_by_length), the shuffled order is cut into mega-batches of
    50 x batch_size, each sorted by length (longest first) and cut into batches, and the batches
    are shuffled: batches of similar lengths, so less padding, in a seeded order."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_examples, generator=gen).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    mega = 50 * batch_size
    batches = []
    for start in range(0, n_examples, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffled]


@torch.no_grad()
def packing_isolates(model: torch.nn.Module, device: str) -> bool:
    """Does this model keep packed examples apart? Two packed rows that differ only in their
    first example must give the second example identical logits (probed with a few tokens,
    in eval mode so that dropout does not differ between the two passes)."""
    inner = getattr(model, "module", model)  # DDP
    vocab = inner.get_input_embeddings().num_embeddings
    first = torch.arange(1, 7) % vocab
    second = torch.arange(7, 12) % vocab
    rows = torch.stack([torch.cat([first, second]), torch.cat([first.flip(0), second])])
    positions = torch.cat([torch.arange(6), torch.arange(5)]).expand(2, -1)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=rows.to(device), position_ids=positions.to(device), use_cache=False)
        logits = out.logits[:, 6:].float()
    finally:
        model.train(was_training)
    scale = 1e-3 * (1 + float(logits.abs().max()))
    return bool((logits[0] - logits[1]).abs().max() <= scale)


def eval_batches(
    examples: list[Example], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_id)


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that count toward the loss: labels at positions 1.. (each predicted from t - 1)."""
    return int((labels[:, 1:] != IGNORE).sum())
