"""The demo and benchmark scripts run end to end (tiny sizes, CPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def test_demo_runs_and_writes_plot(tmp_path):
  out = run(["experiments/demo.py", "--config=configs/demo.py",
             "--config.seq_len=256", "--config.kernel_check_seq_len=128",
             "--config.block_q=32", "--config.block_kv=32",
             f"--config.output_dir={tmp_path}"], tmp_path)
  assert "plot written to" in out
  assert "same skip counts as the oracle: True" in out
  png = tmp_path / "demo_sparsity_error.png"
  assert png.stat().st_size > 10_000
  sweep = json.loads((tmp_path / "demo_sweep.json").read_text())["sweep"]
  sparsity = [sum(r["sparsity"]) for r in sweep]
  assert sparsity[0] == 0 and sparsity[-1] > 0
  assert sparsity == sorted(sparsity)       # more λ, more skipping


def test_bench_prefill_smoke(tmp_path):
  output = tmp_path / "prefill.json"
  run(["experiments/bench_prefill.py",
       "--config=configs/bench_prefill.py:smoke",
       f"--config.output={output}"], tmp_path)
  result = json.loads(output.read_text())
  assert result["device_kind"] and result["jax_version"]
  fields = {"impl", "causal", "batch", "seq_len", "q_heads", "kv_heads",
            "head_dim", "dtype", "threshold", "sparsity", "time_ms", "tflops",
            "dense_equiv_tflops"}
  assert result["rows"] and all(fields <= set(r) for r in result["rows"])
  assert all(c["skip_count_mismatch"] == 0 for c in result["checks"])
  assert (tmp_path / "prefill.png").stat().st_size > 10_000
