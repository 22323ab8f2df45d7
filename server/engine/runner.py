"""One step on the model: lay the scheduled chunks out as rows, run the forward, sample the next tokens."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from server.engine.kv_cache import KVCache
from server.engine.sampler import RowState, sample
from server.engine.scheduler import ScheduledChunk
from server.engine.types import TokenLogprob
from server.model.attention import AttentionMeta, DecodeGroup, PrefillChunk
from server.model.deltas import ResidentDelta, StepDeltas
from server.model.llama import ForwardBatch, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, tokenizer: Any) -> None:
        self.model = model
        self.kv = kv
        self.tokenizer = tokenizer

    def step(self, chunks: Seq[ScheduledChunk]) -> tuple[list[ScheduledChunk], list[int], list[TokenLogprob | None]]:
        """Run the chunks (decodes first in `order`); returns the sampling chunks with their tokens."""
        order = sorted(chunks, key=lambda c: c.num_tokens > 1)
        batch, row_tasks = self._layout(order)
        deltas = self._deltas(order, row_tasks, batch.logit_rows)
        logits = self.model.forward(batch, self.kv.layers, deltas)
        sampling = [c for c in order if c.samples]
        rows = [RowState(c.seq.request.params, c.seq.output, c.seq.generator) for c in sampling]
        tokens, logprobs = sample(logits, rows, self._token_text)
        return sampling, tokens, logprobs

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _layout(self, order: Seq[ScheduledChunk]) -> tuple[ForwardBatch, list[str | None]]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        row_tasks: list[str | None] = []
        prefills: list[PrefillChunk] = []
        for c in order:
            row = len(ids)
            ctx = c.start + c.num_tokens
            ids.extend(c.seq.tokens(c.start, ctx))
            positions.extend(range(c.start, ctx))
            token_slots = self.kv.token_slots(c.seq.blocks, ctx)
            slots.append(token_slots[c.start :])
            row_tasks.extend([c.seq.task] * c.num_tokens)
            if c.samples:
                logit_rows.append(row + c.num_tokens - 1)
            if c.num_tokens > 1:
                prefills.append(PrefillChunk(row, c.num_tokens, ctx, token_slots.to(self.model.device)))
        meta = AttentionMeta(
            torch.cat(slots).to(self.model.device), self._decode_group([c for c in order if c.num_tokens == 1]),
            tuple(prefills),
        )
        dev = self.model.device
        batch = ForwardBatch(
            torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), torch.tensor(logit_rows, device=dev),
            meta,
        )
        return batch, row_tasks

    def _decode_group(self, decodes: Seq[ScheduledChunk]) -> DecodeGroup | None:
        """Single-token chunks (rows 0..B-1): their context slots padded to the longest, and the mask."""
        if not decodes:
            return None
        lengths = torch.tensor([c.start + 1 for c in decodes])
        width = int(lengths.max())
        table = torch.zeros(len(decodes), width, dtype=torch.int64)
        for i, c in enumerate(decodes):
            table[i, : c.start + 1] = self.kv.token_slots(c.seq.blocks, c.start + 1)
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, L]
        dev = self.model.device
        return DecodeGroup(torch.arange(len(decodes), device=dev), table.to(dev), mask[:, None, None, :].to(dev))

    def _deltas(
        self, order: Seq[ScheduledChunk], row_tasks: list[str | None], logit_rows: torch.Tensor
    ) -> StepDeltas | None:
        """The step's delta view: one slot per distinct task present; None when every row is base-only."""
        slots: dict[str, ResidentDelta] = {}
        for c in order:
            if c.seq.task is not None and c.seq.task not in slots:
                slots[c.seq.task] = c.seq.delta_entry.delta
        if not slots:
            return None
        index = {task: j for j, task in enumerate(slots)}
        row_slots = torch.tensor([index[t] if t is not None else -1 for t in row_tasks], device=self.model.device)
        return StepDeltas(list(slots.values()), row_slots, logit_rows, self.model.dtype)
