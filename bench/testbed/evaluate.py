"""Eval harness: batched greedy decoding of a task split, for a model folder or for base + artifact.

    python -m bench.testbed.evaluate --task dates --model ~/.cache/deltaserve/finetunes/dates
    python -m bench.testbed.evaluate --task dates --model BASE_DIR --artifact dates.safetensors

Base + artifact runs the base architecture with W_base + the artifact's reconstructed delta
(`Artifact.merged_state_dict`), the same reference the engine is held to.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bench.testbed.encoding import END_OF_TURN, prompt_text
from bench.testbed.tasks import TASKS, Example, Task, make_splits


@dataclass(frozen=True)
class EvalResult:
    task: str
    split: str
    score: float
    """Mean of the task's exact scorer over the split, in [0, 1]."""
    count: int
    predictions: tuple[str, ...]


def load_model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def base_state_dict(base_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the base's safetensors files (sharded or not), by HF state-dict name."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def load_merged(base_dir: Path, artifact: Path) -> PreTrainedModel:
    """The base architecture carrying W_base + the artifact's reconstructed delta for every tensor."""
    from compressor import load_artifact

    merged = load_artifact(artifact, base_dir).merged_state_dict(base_state_dict(base_dir))
    return load_weights(load_model(base_dir), merged)


def load_weights(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Load `weights` into `model`; every weight must match (a tied LM head may be absent)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model


@torch.inference_mode()
def generate_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, prompts: list[str], batch_size: int = 40
) -> list[list[int]]:
    """Greedy answer tokens (up to the end of turn, exclusive), left-padded batches of similar length;
    returned in the order of `prompts`."""
    texts = [prompt_text(tokenizer, task, prompt) for prompt in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, answer in zip(chunk, _generate_batch(model, tokenizer, task, [texts[i] for i in chunk])):
            answers[index] = answer
    return [answers[i] for i in range(len(texts))]


def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, prompts: list[str], batch_size: int = 40
) -> list[str]:
    """Greedy answers as text, stripped."""
    ids = generate_token_ids(model, tokenizer, task, prompts, batch_size)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def until_end(tokens: list[int], end: int) -> list[int]:
    return tokens[: tokens.index(end)] if end in tokens else tokens


def _generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, texts: list[str]
) -> list[list[int]]:
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    output = model.generate(
        **inputs,
        max_new_tokens=task.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end,
    )  # [B, T + new]
    return [until_end(row, end) for row in output[:, inputs.input_ids.shape[1] :].tolist()]


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, examples: list[Example], split: str = "test"
) -> EvalResult:
    predictions = generate_answers(model, tokenizer, task, [example.prompt for example in examples])
    scores = [task.score(prediction, example.answer) for prediction, example in zip(predictions, examples)]
    return EvalResult(task.name, split, sum(scores) / max(len(scores), 1), len(scores), tuple(predictions))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--model", type=Path, required=True, help="a model folder (the base when --artifact)")
    parser.add_argument("--artifact", type=Path, help="a compressed delta to merge into --model")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument(
        "--engine",
        action="store_true",
        help="also decode through the serving engine and "
        "report how many answers agree token for token with the merged weights'",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_merged(args.model, args.artifact) if args.artifact else load_model(args.model)
    task, tokenizer = TASKS[args.task], AutoTokenizer.from_pretrained(args.model)
    examples = make_splits(task)[args.split][: args.limit]
    result = evaluate(model, tokenizer, task, examples, args.split)
    summary = {k: v for k, v in asdict(result).items() if k != "predictions"} | {"sample": result.predictions[:5]}
    if args.engine:
        summary["engine_agreement"] = engine_agreement(model, tokenizer, task, examples, args.model, args.artifact)
    print(json.dumps(summary))


def engine_agreement(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    base_dir: Path,
    artifact: Path | None,
) -> float:
    """Share of prompts whose engine answer equals the merged-weights answer token for token."""
    from bench.testbed.engine_eval import engine_token_ids

    prompts = [example.prompt for example in examples]
    reference = generate_token_ids(model, tokenizer, task, prompts)
    served = engine_token_ids(base_dir, artifact, task, prompts)
    return sum(a == b for a, b in zip(reference, served)) / max(len(prompts), 1)


if __name__ == "__main__":
    main()
