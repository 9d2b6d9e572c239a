#!/usr/bin/env bash
# Re-measures the committed results on the GPU this runs on: every benchmark
# writes <stem>_<device>.{json,png} into benchmarks/results/ (the files of
# other devices stay). Run from the repository root on a GPU machine; each
# line is one device-sized command, so they can also be run one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
run() { python3 -m "experiments.$1" "${@:2}" --config.output_dir="$out" 2>&1 | tee "$out/$1.log"; }
run bench_prefill --config=configs/bench_prefill.py
run bench_decode --config=configs/bench_decode.py
run bench_backward --config=configs/bench_backward.py
run sparse_prefill --config=configs/sparse_prefill.py
run sparse_prefill --config=configs/sparse_prefill.py:frontier
run bench_multigpu --config=configs/bench_multigpu.py
# The pretrained-model study and its latency (needs the [lm] extra and SmolLM2).
tag=$(python3 -c 'import jax; from blasst_jax import testing; print(testing.device_tag(jax.devices()[0].device_kind))')
python3 -m experiments.eval_llm --config=configs/eval_llm.py \
    --config.output_dir="$out/eval_llm_$tag"
python3 -m experiments.bench_generate --config=configs/bench_generate.py \
    --config.output_dir="$out" --config.from_results="$out/eval_llm_$tag/results.json"
