"""Prompts through the base's chat template, and training rows whose labels cover the answer only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from bench.testbed.tasks import Example, Task

END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class TrainingRow:
    input_ids: list[int]
    answer_start: int
    """Index of the first answer token; tokens from here on (answer + end of turn) carry the loss."""


def prompt_text(tokenizer: PreTrainedTokenizerBase, task: Task, prompt: str) -> str:
    """The chat-templated prompt: the task's instruction as system message, the input as user message."""
    messages = [{"role": "system", "content": task.instruction}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def training_row(tokenizer: PreTrainedTokenizerBase, task: Task, example: Example) -> TrainingRow:
    prompt_ids = tokenizer(prompt_text(tokenizer, task, example.prompt), add_special_tokens=False).input_ids
    answer_ids = tokenizer(example.answer + END_OF_TURN, add_special_tokens=False).input_ids
    return TrainingRow(prompt_ids + answer_ids, len(prompt_ids))


def collate(rows: list[TrainingRow], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: input_ids [B, T], attention_mask [B, T], loss_mask [B, T] (1 where the token
    at t+1 is an answer token to predict from position t)."""
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        attention[i, :n] = 1
        loss_mask[i, row.answer_start - 1 : n - 1] = True
    return ids, attention, loss_mask
