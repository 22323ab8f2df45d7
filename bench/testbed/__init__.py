"""The quality testbed: generated tasks, full fine-tunes of the base, and an eval harness.

tasks.py    seeded generators, splits and exact scorers
encoding.py prompts through the base's chat template; training rows with answer-only labels
finetune.py full fine-tuning (every weight, AdamW) into ~/.cache/deltaserve/finetunes/<task>
evaluate.py batched greedy decoding of a split for a model folder or base + artifact
"""
