"""Document boundaries inside a training window: Megatron's --reset-attention-mask,
--reset-position-ids and --eod-mask-loss.

A window of packed data (pretraining documents, or fine-tuning examples under
`data.sft_packing`) holds the end of one document, whole ones, and the start of another. By
default a token attends to every token before it in the window and positions run 0..s-1 across
it (GPT-2's and Megatron's default). With the `data` settings below, the loader adds to each
micro-batch what keeps the documents apart; an end-of-document token ends its document and the
token after it begins the next, as Megatron's `get_ltor_masks_and_position_ids` decides:

- `reset_attention_mask`: `document_ids` (b, s) int32, the index of each token's document in its
  row (0, 1, ...; non-decreasing), which every attention layer turns into a mask: a token
  attends only to the earlier tokens of its own document.
- `reset_position_ids`: `position_ids` (b, s) int64, counted from 0 at each document's first token.
- `eod_mask_loss`: the loss mask is 0 where the input token is an end-of-document token (its
  label is the next document's first token, which nothing before it predicts).

Fine-tuning examples end with `<|endoftext|>`, so these apply to packed fine-tuning data as they
do to pretraining data made with `--append-eod`. In data without end-of-document tokens the
documents run together and nothing here tells them apart (the trainer warns when a dataset's
record says it was made so).
"""
from __future__ import annotations

import torch
from torch.utils.data import default_collate


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(b, s) int32: the index of each token's document in its row, from the input tokens
    (b, s); an end-of-document token belongs to the document it ends."""
    is_eod = (tokens == eod_id).to(torch.int32)
    return torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(b, s) int64: each token's position counted from its document's first token, from
    `document_ids`' (b, s) output."""
    b, s = documents.shape
    index = torch.arange(s, dtype=torch.int64).expand(b, s)
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


class DocumentCollate:
    """The loader's collate function under data.reset_attention_mask, reset_position_ids or
    eod_mask_loss: the default collation, then `document_ids`, `position_ids` and the loss mask
    as the module docstring says. A plain class, so loader workers can take it."""

    def __init__(self, eod_id: int, *, reset_attention_mask: bool, reset_position_ids: bool,
                 eod_mask_loss: bool):
        self.eod_id = eod_id
        self.reset_attention_mask, self.reset_position_ids = reset_attention_mask, reset_position_ids
        self.eod_mask_loss = eod_mask_loss

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        tokens = batch["tokens"]
        if self.reset_attention_mask or self.reset_position_ids:
            documents = document_ids(tokens, self.eod_id)
            if self.reset_attention_mask:
                batch["document_ids"] = documents
            if self.reset_position_ids:
                batch["position_ids"] = document_positions(documents)
        if self.eod_mask_loss:
            batch["loss_mask"] = batch["loss_mask"].masked_fill(tokens == self.eod_id, 0.0)
        return batch


def asks_for_documents(data) -> bool:
    """Whether `data` (a DataConfig) sets any of the three document settings."""
    return data.reset_attention_mask or data.reset_position_ids or data.eod_mask_loss


def document_collate(data, eod_id: int) -> DocumentCollate | None:
    """The collate function `data` (a DataConfig) asks for, or None (the default collation)."""
    if not asks_for_documents(data):
        return None
    return DocumentCollate(eod_id, reset_attention_mask=data.reset_attention_mask,
                           reset_position_ids=data.reset_position_ids,
                           eod_mask_loss=data.eod_mask_loss)


def document_inputs(micro_batch: dict) -> dict:
    """A model stage's keyword arguments from a micro-batch: `positions` and `document_ids`
    (None where the loader added none)."""
    return dict(positions=micro_batch.get("position_ids"),
                document_ids=micro_batch.get("document_ids"))
