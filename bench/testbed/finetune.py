"""Full fine-tuning of the base on one task: every weight, AdamW, fp32, one thread, seeded.

    python -m bench.testbed.finetune --task dates [--steps N --batch 8 --lr 1e-4]

Writes an HF folder (config, model.safetensors, tokenizer, chat template) to
~/.cache/deltaserve/finetunes/<task> plus `testbed-finetune.json` (settings, wall time, losses).
bf16 autocast is off: on this AVX2-only CPU it measured 15x slower than fp32 (3 vs 42 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

from bench.measure import DEFAULT_BASE
from bench.testbed.encoding import TrainingRow, collate, training_row
from bench.testbed.tasks import TASKS, Task, make_splits

FINETUNE_CACHE = Path("~/.cache/deltaserve/finetunes").expanduser()
REPORT = "testbed-finetune.json"
TRAIN_STEPS = {"dates": 32, "routing": 32, "extraction": 24, "email": 24}
"""Steps of batch 8 per task, sized from the measured ~40 tokens/s of one thread (see docs/quality.md)."""


@dataclass(frozen=True)
class TrainConfig:
    task: str
    steps: int = 32
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 3
    seed: int = 0


def answer_loss(
    model: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy on answer tokens only; the LM head runs on those positions alone (saves ~20% FLOPs).
    ids, attention, loss_mask: [B, T]."""
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state  # [B, T, H]
    logits = model.lm_head(hidden[loss_mask])  # [M, V]
    targets = ids.roll(-1, dims=1)[loss_mask]  # [M]
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def batches(rows: list[TrainingRow], config: TrainConfig) -> list[list[TrainingRow]]:
    """`config.steps` batches, walking seeded shuffles of the training rows (epochs wrap around)."""
    rng, order = random.Random(config.seed), []
    while len(order) < config.steps * config.batch:
        epoch = list(range(len(rows)))
        rng.shuffle(epoch)
        order += epoch
    return [[rows[i] for i in order[s * config.batch : (s + 1) * config.batch]] for s in range(config.steps)]


def train(model: PreTrainedModel, rows: list[TrainingRow], config: TrainConfig, pad_id: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, config.warmup, config.steps)
    model.train()
    losses: list[float] = []
    for step, batch in enumerate(batches(rows, config)):
        loss = answer_loss(model, *collate(batch, pad_id))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        print(f"{config.task} step {step + 1}/{config.steps} loss {losses[-1]:.4f}", flush=True)
    return losses


def finetune(config: TrainConfig, base_dir: Path = DEFAULT_BASE, cache: Path = FINETUNE_CACHE) -> Path:
    """Fine-tune every weight of the base on `config.task`; publish the folder atomically."""
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    task: Task = TASKS[config.task]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = [training_row(tokenizer, task, example) for example in make_splits(task)["train"]]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    started = time.monotonic()
    losses = train(model, rows, config, tokenizer.pad_token_id)
    report = {
        "config": asdict(config),
        "wall_s": round(time.monotonic() - started, 1),
        "losses": losses,
        "train_tokens": sum(len(r.input_ids) for b in batches(rows, config) for r in b),
        "threads": torch.get_num_threads(),
    }
    return _publish(model, tokenizer, base_dir, cache / config.task, report)


def _publish(model: PreTrainedModel, tokenizer: AutoTokenizer, base_dir: Path, dest: Path, report: dict) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for extra in ["chat_template.jinja", "generation_config.json"]:
        if (base_dir / extra).is_file():
            shutil.copy(base_dir / extra, tmp / extra)
    (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: TRAIN_STEPS of the task)")
    for field in ["batch", "warmup", "seed"]:
        parser.add_argument(f"--{field}", type=int, default=TrainConfig.__dataclass_fields__[field].default)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    args = parser.parse_args(argv)
    steps = args.steps or TRAIN_STEPS[args.task]
    config = TrainConfig(args.task, steps, args.batch, args.lr, args.warmup, args.seed)
    print(f"wrote {finetune(config)}")


if __name__ == "__main__":
    main()
