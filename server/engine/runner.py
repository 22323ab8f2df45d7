"""One step on the model: lay the scheduled chunks out as rows, run the forward, sample the next tokens.

A fault belongs to the requests that cause it. Sampling reports a failure per row (non-finite logits,
a failed draw). When the joint forward itself raises, the step is re-run task by task and then chunk by
chunk, so only the chunks that fail alone are failed; the re-runs write the same KV slots again, and no
sequence's progress is recorded before its chunk succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from server.engine.detokenizer import decode_text
from server.engine.kv_cache import KVCache
from server.engine.sampler import RowState, Sampled, sample
from server.engine.scheduler import ChunkResult, ScheduledChunk
from server.engine.types import RequestFailedError
from server.model.attention import AttentionMeta, DecodeGroup, PrefillChunk
from server.model.deltas import ResidentDelta, StepDeltas
from server.model.llama import ForwardBatch, LlamaModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("deltaserve.engine")
FORWARD_FAILED = "The engine could not run the model for this request."


class ModelRunner:
    """Runs one step's scheduled chunks on the model and samples their next tokens."""

    def __init__(self, model: LlamaModel, kv: KVCache, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.kv = kv
        self.tokenizer = tokenizer

    def step(self, chunks: Seq[ScheduledChunk]) -> list[ChunkResult]:
        """Run the chunks in one forward; on a forward failure, isolate it (see the module docstring)."""
        order = sorted(chunks, key=lambda c: c.num_tokens > 1)
        try:
            return self._run(order)
        except Exception:
            log.exception("the step's forward failed for %d chunks; re-running them by task", len(order))
        results: list[ChunkResult] = []
        for group in _by_task(order):
            results.extend(self._run_isolated(group))
        return results

    def _run_isolated(self, group: list[ScheduledChunk]) -> list[ChunkResult]:
        """Run `group` alone; when it fails too, each chunk alone; a chunk that fails alone is failed."""
        try:
            return self._run(group)
        except Exception:
            if len(group) > 1:
                return [result for chunk in group for result in self._run_isolated([chunk])]
            log.exception("request %s failed alone in the forward; ending it", group[0].seq.request_id)
            return [ChunkResult(group[0], error=RequestFailedError(FORWARD_FAILED))]

    def _run(self, order: list[ScheduledChunk]) -> list[ChunkResult]:
        """Forward `order` (decodes first) as one batch and sample the chunks that reach their end."""
        batch, row_tasks = self._layout(order)
        deltas = self._deltas(order, row_tasks, batch.logit_rows)
        logits = self.model.forward(batch, self.kv.layers, deltas)  # [R, vocab]
        sampling = [c for c in order if c.samples]
        rows = [RowState(c.seq.request.params, c.seq.output, c.seq.generator, c.seq.matcher) for c in sampling]
        drawn = dict(zip(map(id, sampling), sample(logits, rows, self._token_text)))
        return [_result(c, drawn.get(id(c))) for c in order]

    def _token_text(self, token_id: int) -> str:
        return decode_text(self.tokenizer, [token_id])

    def _layout(self, order: Seq[ScheduledChunk]) -> tuple[ForwardBatch, list[str | None]]:
        """The step's rows (decodes first) and the task of each row. Every chunk's cache slots are computed
        here once, for the whole step: the slots each row's K/V is written to, each prefill's context and
        the decodes' padded context table; every layer reuses them."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        row_tasks: list[str | None] = []
        prefills: list[PrefillChunk] = []
        decodes: list[torch.Tensor] = []
        for c in order:
            row = len(ids)
            ctx = c.start + c.num_tokens
            ids.extend(c.seq.tokens(c.start, ctx))
            positions.extend(range(c.start, ctx))
            token_slots = self.kv.token_slots(c.seq.blocks, ctx)  # [ctx] int64, on the host
            slots.append(token_slots[c.start :])
            row_tasks.extend([c.seq.task] * c.num_tokens)
            if c.samples:
                logit_rows.append(row + c.num_tokens - 1)
            if c.num_tokens > 1:
                prefills.append(PrefillChunk(row, c.num_tokens, ctx, token_slots.to(self.model.device)))
            else:
                decodes.append(token_slots)
        meta = AttentionMeta(torch.cat(slots).to(self.model.device), self._decode_group(decodes), tuple(prefills))
        return ForwardBatch.of(ids, positions, logit_rows, meta, self.model.device), row_tasks

    def _decode_group(self, contexts: list[torch.Tensor]) -> DecodeGroup | None:
        """Single-token chunks (rows 0..B-1) from each one's context slots ([L_i] int64): the slots padded
        to the longest (with the cache's always-zero pad slot), and the mask."""
        if not contexts:
            return None
        lengths = torch.tensor([len(slots) for slots in contexts], dtype=torch.int64)
        width = int(lengths.max())
        table = torch.full((len(contexts), width), self.kv.pad_slot, dtype=torch.int64)
        for i, slots in enumerate(contexts):
            table[i, : len(slots)] = slots
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, L]
        dev = self.model.device
        return DecodeGroup(torch.arange(len(contexts), device=dev), table.to(dev), mask[:, None, None, :].to(dev))

    def _deltas(
        self, order: Seq[ScheduledChunk], row_tasks: list[str | None], logit_rows: torch.Tensor
    ) -> StepDeltas | None:
        """The step's delta view: one slot per distinct task present; None when every row is base-only."""
        slots: dict[str, ResidentDelta] = {}
        for c in order:
            task, entry = c.seq.task, c.seq.delta_entry
            if task is not None and task not in slots:
                if entry is None:
                    raise RuntimeError(f"request {c.seq.request_id} runs task {task!r} without a pinned delta")
                slots[task] = entry.delta
        if not slots:
            return None
        index = {task: j for j, task in enumerate(slots)}
        row_slots = torch.tensor(
            [index[t] if t is not None else -1 for t in row_tasks], dtype=torch.int64, device=self.model.device
        )
        return StepDeltas(list(slots.values()), row_slots, logit_rows, self.model.dtype)


def _by_task(order: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """The chunks grouped by task (the base's chunks one group), first appearance first, order kept."""
    groups: dict[str | None, list[ScheduledChunk]] = {}
    for chunk in order:
        groups.setdefault(chunk.seq.task, []).append(chunk)
    return list(groups.values())


def _result(chunk: ScheduledChunk, drawn: Sampled | RequestFailedError | None) -> ChunkResult:
    if isinstance(drawn, RequestFailedError):
        return ChunkResult(chunk, error=drawn)
    if drawn is None:
        return ChunkResult(chunk)
    return ChunkResult(chunk, drawn.token, drawn.logprob)
