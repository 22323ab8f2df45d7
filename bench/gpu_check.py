"""The Python steps of bench/gpu_check.sh (docs/kernels.md, "GPU check").

    python bench/gpu_check.py env                       # versions, the GPU's name, nvidia-smi
    python bench/gpu_check.py model CARRIED DEST [--layers N]
                                                        # a random model of the carried config's shapes
    python bench/gpu_check.py summary STEPS SUMMARY     # the steps file -> summary.json

The model step builds random weights with transformers from SmolLM2's config and copies its tokenizer and
generation config beside them: throughput does not depend on the weights' values, and the real weights are
too big to carry to the GPU machine. `--layers` cuts the depth (the CPU dry run's tiny size).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # as a script, bench/kernels.py would shadow the `kernels` package (and HF's `kernels` probe)

CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
"""What the model step copies beside the random weights (config.json is written by save_pretrained)."""
CARRIED_PACKAGES = {
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "xgrammar": "xgrammar",
    "pytest_asyncio": "pytest-asyncio",
    "jsonschema": "jsonschema",
}
"""Imports the carried wheels provide on the GPU machine (PINS in gpu_check.sh): the env step shows where each
one loads from (import name -> distribution)."""


def environment() -> int:
    """Print Python, torch, CUDA, Triton and transformers versions, the device's name and nvidia-smi."""
    import torch
    import transformers

    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, transformers {transformers.__version__}")
    print(f"pytest {importlib.metadata.version('pytest')} (pytest-asyncio 1.5 needs >= 8.4)")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as exc:
        print(f"triton: not importable ({exc})")
    for name, dist in CARRIED_PACKAGES.items():
        try:
            module = importlib.import_module(name)
            print(f"{dist} {importlib.metadata.version(dist)} from {module.__file__}")
        except ImportError as exc:
            print(f"{dist}: not importable ({exc})")
    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    else:
        print("nvidia-smi: not on PATH")
    return 0


def build_model(carried: Path, dest: Path, layers: int | None) -> int:
    """Random weights (seed 0, float32) of the config in `carried`, saved with its tokenizer in `dest`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(carried)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(dest)
    for name in CARRIED_FILES:
        shutil.copy(carried / name, dest / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"random {config.model_type} model, {config.num_hidden_layers} layers, {params / 1e6:.1f}M params -> {dest}")
    return 0


def summarise(steps: Path, summary: Path) -> int:
    """summary.json from the steps file's lines `name rc seconds log`: every step, its exit code, seconds and
    log file, and `ok` (every step exited 0). A skipped step (no time left) has rc "skipped". Exit 1 unless ok."""
    records = []
    for line in steps.read_text().splitlines():
        name, rc, seconds, log = line.split()
        records.append({
            "step": name,
            "exit_code": int(rc) if rc.lstrip("-").isdigit() else rc,
            "seconds": int(seconds),
            "log": log,
        })  # fmt: skip
    report = {"ok": all(r["exit_code"] == 0 for r in records), "steps": records}
    summary.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch one step (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    sub.add_parser("env")
    model = sub.add_parser("model")
    model.add_argument("carried", type=Path, help="folder with config.json, tokenizer and generation config")
    model.add_argument("dest", type=Path)
    model.add_argument("--layers", type=int, default=None, help="fewer layers than the config (dry run)")
    summary = sub.add_parser("summary")
    summary.add_argument("steps", type=Path)
    summary.add_argument("summary", type=Path)
    args = ap.parse_args(argv)
    if args.step == "env":
        return environment()
    if args.step == "model":
        return build_model(args.carried, args.dest, args.layers)
    return summarise(args.steps, args.summary)


if __name__ == "__main__":
    sys.exit(main())
