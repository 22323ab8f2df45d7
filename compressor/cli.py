"""`deltaserve compress | import-lora | inspect | merge | reconstruct`: the compressor's subcommands.

Registered by server/cli.py through `register(subparsers)`; heavy imports happen in the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from compressor.codec import json_float, json_int
from compressor.pipeline import ADAPTER_METHODS, METHODS, WHOLE

if TYPE_CHECKING:
    from compressor.summary import ArtifactSummary

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What server/cli.py hands to register(): its subcommand table (generic only to the type checker)."""


def register(sub: Subparsers) -> None:
    """Add the compressor's subcommands (compress, import-lora, inspect, merge, reconstruct) to `sub`."""
    _register_compress(sub)
    _register_import_lora(sub)
    inspect = sub.add_parser("inspect", help="show an artifact's manifest, both ratios and per-module error")
    inspect.add_argument("artifact", type=Path, help="artifact file")
    inspect.add_argument("--base", type=Path, default=None, help="also validate against this base folder")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--modules", action="store_true", help="list every module's layout, rank and error")
    inspect.set_defaults(handler=_cmd_inspect)
    rec = sub.add_parser("reconstruct", help="write base + artifact delta as a full HF checkpoint folder")
    rec.add_argument("artifact", type=Path, help="artifact file")
    rec.add_argument("--base", type=Path, required=True, help="base model folder")
    rec.add_argument("--out", type=Path, required=True, help="output folder (created)")
    rec.set_defaults(handler=_cmd_reconstruct)
    _register_merge(sub)


def _register_compress(sub: Subparsers) -> None:
    p = sub.add_parser("compress", help="compress a fine-tune against the base into an artifact")
    p.add_argument("--base", type=Path, required=True, help="base model folder (HF layout, safetensors)")
    p.add_argument("--finetuned", type=Path, required=True, help="fine-tuned model folder, same architecture")
    p.add_argument("--out", type=Path, required=True, help="artifact file to write")
    p.add_argument("--method", choices=METHODS, default="impart", help="compression method")
    p.add_argument("--ratio", type=float, default=32.0, help="compression ratio (CR; CR_qt for -qt methods)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drops (masks regenerate from it)")
    p.add_argument("--beta", type=float, default=0.8, help="ImPart pre-prune share of singular vectors")
    p.add_argument("--c", type=float, default=0.5, help="ImPart importance exponent C")
    p.add_argument("--svd", choices=["auto", "full", "lowrank"], default="auto", help="SVD algorithm")
    p.add_argument("--device", default=None, help="torch device for the SVD (default: cuda when present)")
    p.add_argument("--bits", type=int, default=4, help="DARE-Qt bit width")
    p.add_argument(
        "--gptq-prompts",
        type=int,
        default=0,
        help="impart-qt: quantise V by GPTQ on this many built-in calibration prompts (loads the model)",
    )
    p.add_argument(
        "--embedding-method",
        choices=[*METHODS, WHOLE],
        default=None,
        help="method for the embedding / LM head (default: --method)",
    )
    p.add_argument("--embedding-ratio", type=float, default=None, help="ratio for the embedding / LM head")
    p.set_defaults(handler=_cmd_compress)


def _register_import_lora(sub: Subparsers) -> None:
    p = sub.add_parser("import-lora", help="turn a PEFT LoRA adapter folder into an artifact (method lora, exact)")
    p.add_argument("adapter", type=Path, help="adapter folder: adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base", type=Path, required=True, help="base model folder the adapter was trained on")
    p.add_argument("--out", type=Path, required=True, help="artifact file to write")
    p.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="compress the adapter's delta to this CR instead of storing its factors exactly",
    )
    p.add_argument("--method", choices=ADAPTER_METHODS, default="impart", help="method used with --ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drops (with --ratio)")
    p.set_defaults(handler=_cmd_import_lora)


def _register_merge(sub: Subparsers) -> None:
    p = sub.add_parser("merge", help="merge several fine-tunes' deltas (Task Arithmetic or TIES) into one artifact")
    p.add_argument("inputs", nargs="+", help="artifacts (.safetensors files) and/or fine-tuned model folders")
    p.add_argument("--base", type=Path, required=True, help="base model folder")
    p.add_argument("--out", type=Path, required=True, help="merged artifact file to write")
    p.add_argument("--how", choices=["ta", "ties"], default="ta", help="Task Arithmetic or TIES")
    p.add_argument("--scale", type=float, default=1.0, help="lambda applied to the merged delta")
    p.add_argument("--density", type=float, default=0.2, help="TIES: share of entries kept per delta")
    p.add_argument(
        "--store",
        choices=[*METHODS, WHOLE],
        default=WHOLE,
        help="how the merged delta is stored: whole (16-bit) or re-compressed",
    )
    p.add_argument("--ratio", type=float, default=32.0, help="ratio when --store re-compresses")
    p.set_defaults(handler=_cmd_merge)


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from compressor import IncompatibleCheckpointError, compress

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = compress(
            args.base,
            args.finetuned,
            args.out,
            method=args.method,
            ratio=args.ratio,
            seed=args.seed,
            beta=args.beta,
            c=args.c,
            svd=args.svd,
            device=device,
            bits=args.bits,
            gptq_prompts=args.gptq_prompts,
            embedding_method=args.embedding_method,
            embedding_ratio=args.embedding_ratio,
        )
    except IncompatibleCheckpointError as exc:
        print(f"deltaserve compress: {exc}", file=sys.stderr)
        return 2
    print(f"{report.out_path}: {report.artifact_bytes} bytes, sha256 {report.sha256}")
    print(
        f"linear CR {report.linear_cr:.2f} (bytes {report.linear_bytes_ratio:.2f}x), "
        f"whole artifact {report.whole_ratio:.2f}x vs dense 16-bit delta, {report.seconds:.1f} s"
    )
    return 0


def _cmd_import_lora(args: argparse.Namespace) -> int:
    from compressor.errors import AdapterError, IncompatibleCheckpointError
    from compressor.lora import import_lora

    try:
        report = import_lora(args.adapter, args.base, args.out, ratio=args.ratio, method=args.method, seed=args.seed)
    except AdapterError as exc:
        print(f"deltaserve import-lora: {exc.field}: {exc}", file=sys.stderr)
        return 2
    except IncompatibleCheckpointError as exc:
        print(f"deltaserve import-lora: {exc}", file=sys.stderr)
        return 2
    ranks = sorted({m.rank for m in report.modules if m.rank})
    print(f"{report.out_path}: {report.artifact_bytes} bytes, sha256 {report.sha256}")
    print(
        f"{len(report.modules)} modules, rank {_span(ranks)}, whole artifact {report.whole_ratio:.2f}x "
        f"vs the dense 16-bit delta of those modules"
    )
    return 0


def _span(values: list[int]) -> str:
    if not values:
        return "0"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from compressor import ArtifactError, load_artifact
    from compressor.summary import summarize

    try:
        art = load_artifact(args.artifact, base_dir=args.base)
    except ArtifactError as exc:
        print(f"deltaserve inspect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = summarize(args.artifact, art)
    if args.json:
        print(json.dumps({**asdict(summary), "manifest": _manifest_head(art.manifest)}, indent=1, default=str))
        return 0
    print(_describe(summary, art.manifest))
    if args.modules:
        for name, q in summary.quality.items():
            print(f"  {name:48s} {q['group']:9s} rank {q['rank']:4d} kept {q['kept']:9d} err {q['rel_error']:.4f}")
    return 0


def _manifest_head(manifest: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in manifest.items() if k not in ("modules", "quality")}


def _describe(s: ArtifactSummary, manifest: dict[str, object]) -> str:
    errors = [json_float(q["rel_error"], "rel_error") for q in s.quality.values() if q["group"] == "linear"]
    mean_err = sum(errors) / len(errors) if errors else 0.0
    ranks = sorted({json_int(q["rank"], "rank") for q in s.quality.values() if q.get("rank")})
    return "\n".join(
        [
            f"artifact   {s.path} ({s.file_bytes} bytes, sha256 {s.sha256})",
            f"format     {manifest['format']} v{manifest['version']}, {manifest.get('tool')}, "
            f"created {manifest.get('created')}",
            f"base       fingerprint {manifest['base_fingerprint']}",
            f"method     {s.method} {json.dumps(s.params)}",
            f"ratios     linear CR {s.linear_cr:.2f} (params), linear bytes {s.linear_bytes_ratio:.2f}x, "
            f"whole artifact {s.whole_ratio:.2f}x vs the dense 16-bit delta ({s.dense_delta_bytes} bytes)",
            f"size       {s.over_ideal:.3f}x its ideal {s.ideal_bytes} bytes; "
            f"stored bitmasks would add {s.bitmask_bytes}",
            f"rank       {_span(ranks)} over {len(s.quality)} modules",
            f"quality    mean relative error of the linear layers {mean_err:.4f} over {len(errors)} modules",
        ]
    )


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from compressor import ArtifactError
    from compressor.export import reconstruct

    try:
        print(reconstruct(args.artifact, args.base, args.out))
    except ArtifactError as exc:
        print(f"deltaserve reconstruct: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from compressor.merge import merge

    report = merge(
        [Path(p) for p in args.inputs],
        args.base,
        args.out,
        how=args.how,
        scale=args.scale,
        density=args.density,
        store=args.store,
        ratio=args.ratio,
    )
    print(f"{report.out_path}: {report.artifact_bytes} bytes, sha256 {report.sha256}")
    return 0
