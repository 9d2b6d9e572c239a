"""The demo and benchmark scripts run end to end (tiny sizes, CPU)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# XLA's optimisation passes dominate these tiny CPU runs; the results do
# not depend on them.
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
           JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def run(args, tmp_path, *, cwd=ROOT):
  """`python -m experiments.NAME ARGS...` (args[0] is NAME) from cwd."""
  del tmp_path
  proc = subprocess.run([sys.executable, "-m", f"experiments.{args[0]}",
                         *args[1:]], cwd=cwd, env=ENV, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def run_with_output(script, config, tmp_path, name):
  """Runs `python -m experiments.SCRIPT --config=configs/CONFIG` writing
  tmp_path/NAME.json; returns (stdout, the JSON it wrote)."""
  output = tmp_path / f"{name}.json"
  out = run([script, f"--config=configs/{config}",
             f"--config.output_dir={tmp_path}",
             f"--config.output_name={name}"], tmp_path)
  return out, json.loads(output.read_text())


def test_demo_runs_and_writes_plot(tmp_path):
  # From outside the repository, with the default config: the script finds
  # the repository's configs/demo.py itself.
  out = run(["demo", "--config.seq_len=256",
             "--config.kernel_check_seq_len=128",
             "--config.block_q=32", "--config.block_kv=32",
             f"--config.output_dir={tmp_path}"], tmp_path, cwd=tmp_path)
  assert "plot written to" in out
  assert "same skip counts as the oracle: True" in out
  png = tmp_path / "demo_sparsity_error.png"
  assert png.stat().st_size > 10_000
  sweep = json.loads((tmp_path / "demo_sweep.json").read_text())["sweep"]
  sparsity = [sum(r["sparsity"]) for r in sweep]
  assert sparsity[0] == 0 and sparsity[-1] > 0
  assert sparsity == sorted(sparsity)       # more λ, more skipping


def test_bench_prefill_smoke(tmp_path):
  _, result = run_with_output("bench_prefill", "bench_prefill.py:smoke",
                              tmp_path, "prefill")
  assert result["device_kind"] and result["jax_version"]
  assert result["command"].startswith(
      "python -m experiments.bench_prefill --config=configs/")
  fields = {"impl", "causal", "batch", "seq_len", "q_heads", "kv_heads",
            "head_dim", "dtype", "threshold", "sparsity", "time_ms", "tflops",
            "dense_equiv_tflops"}
  assert result["rows"] and all(fields <= set(r) for r in result["rows"])
  assert all(c["skip_count_mismatch"] == 0 for c in result["checks"])
  assert (tmp_path / "prefill.png").stat().st_size > 10_000
  # Rows at a target sparsity (bisection), on the pattern and on q/k/v
  # captured from every layer of a (tiny) model over two windows.
  for pattern in ("sink_local", "smollm2"):
    targeted = [r for r in result["rows"] if r["pattern"] == pattern
                and r["target"] == 0.3]
    assert targeted and all(0.0 <= r["sparsity"] <= 1.0 for r in targeted)
  model_rows = [r for r in result["rows"] if r["pattern"] == "smollm2"]
  assert {r["batch"] for r in model_rows} == {2 * 2}   # layers x windows
  assert all(r["causal"] for r in model_rows)


def prefill_result(rng, device, command, inputs, causal=False):
  """A bench_prefill result: cuDNN, our dense build and two skip rows at
  each (head_dim, seq_len) of `inputs`, random times; one check each."""
  rows, checks = [], []
  for d, seq in inputs:
    common = dict(pattern="sink_local", causal=causal, batch=1, seq_len=seq,
                  q_heads=4, kv_heads=4, head_dim=d, dtype="bfloat16")
    for impl, thr, sparsity in [("cudnn", 0.0, 0.0),
                                ("pallas_mosaic_noskip", 0.0, 0.0),
                                ("pallas_mosaic", 1e-3, 0.3),
                                ("pallas_mosaic", 1e-1, 0.7)]:
      rows.append(dict(common, impl=impl, threshold=thr, sparsity=sparsity,
                       target=None, time_ms=float(rng.uniform(1, 5))))
    checks.append(dict(impl="pallas_mosaic", causal=causal, threshold=0.0,
                       shape=f"d{d}_{seq}", skip_count_mismatch=0))
  return dict(device_kind=device, jax_version="0.11.2", command=command,
              checks=checks, rows=rows)


def test_bench_prefill_merges_split_and_partial_runs(tmp_path):
  """--merge: a later file's rows replace the earlier rows of its inputs,
  its checks the earlier ones of the same key; every command is listed;
  results of another device kind are refused."""
  rng = np.random.default_rng(0)
  full = prefill_result(rng, "NVIDIA H200", "python -m bench d128 + d64",
                        [(128, 8192), (64, 8192)])
  rerun = prefill_result(rng, "NVIDIA H200", "python -m bench d128",
                         [(128, 8192)])
  paths = []
  for name, result in [("full", full), ("rerun", rerun)]:
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps(result))
  out = run(["bench_prefill", f"--config.output_dir={tmp_path}",
             "--config.output_name=merged",
             f"--merge={paths[0]},{paths[1]}"], tmp_path)
  merged = json.loads((tmp_path / "merged.json").read_text())
  want = [r for r in full["rows"] if r["head_dim"] == 64] + rerun["rows"]
  assert merged["rows"] == want
  assert merged["checks"] == full["checks"][1:] + rerun["checks"]
  assert merged["runs"] == [full["command"], rerun["command"]]
  assert merged["device_kind"] == "NVIDIA H200"
  assert (tmp_path / "merged.png").stat().st_size > 10_000
  own = [r for r in rerun["rows"] if r["impl"] == "pallas_mosaic_noskip"]
  last = rerun["rows"][-1]
  assert f"{own[0]['time_ms'] / last['time_ms']:.3f}" in out.splitlines()[-1]
  # Merging the merged file again with the rerun changes nothing.
  run(["bench_prefill", f"--config.output_dir={tmp_path}",
       "--config.output_name=again",
       f"--merge={tmp_path / 'merged.json'},{paths[1]}"], tmp_path)
  again = json.loads((tmp_path / "again.json").read_text())
  assert again["rows"] == merged["rows"] and again["runs"] == merged["runs"]
  other = tmp_path / "h100.json"
  other.write_text(json.dumps(prefill_result(
      rng, "NVIDIA H100 80GB HBM3", "python -m bench", [(64, 4096)])))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_prefill",
       f"--config.output_dir={tmp_path}", f"--merge={paths[0]},{other}"],
      cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
  assert proc.returncode != 0 and "different devices" in proc.stderr


def test_bench_backward_smoke(tmp_path):
  out, result = run_with_output("bench_backward", "bench_backward.py:small",
                                tmp_path, "backward")
  assert "device_kind=cpu" in out
  rows = result["rows"]
  ours = [r for r in rows if r["impl"] == "pallas_triton"]
  assert [r["threshold"] for r in ours] == [0.0, 1e-3, 1e-2]
  assert ours[0]["sparsity"] == 0 and ours[-1]["sparsity"] > 0
  assert ours[0]["grad_rel_error"] < 1e-4       # dense: the same gradient


def test_profile_backward_summarizes_an_ncu_report(tmp_path):
  """The report's units row is skipped, thousands separators are read,
  launches are listed in order and summed."""
  times_ns = np.random.default_rng(0).integers(1_000, 5_000_000, size=3)
  names = ["loop_transpose_fusion", "blasst_backward_dq_mosaic_kernel",
           "blasst_backward_dkdv_mosaic_kernel"]
  lines = ['==PROF== Connected to process 1',
           '"ID","Kernel Name","Grid Size","gpu__time_duration.sum","x","y"',
           '"","","","ns","",""']
  lines += [f'"{i}","{n}","(16, 64, 4)","{t:,}","a","b"'
            for i, (n, t) in enumerate(zip(names, times_ns))]
  report = tmp_path / "ncu.csv"
  report.write_text("\n".join(lines) + "\n")
  out = run(["profile_backward", f"--summarize={report}"],
            tmp_path).splitlines()
  assert [line.split(None, 2)[2] for line in out[:3]] == names
  got = [float(line.split()[0]) for line in out[:3]]
  np.testing.assert_allclose(got, times_ns / 1e3, atol=0.06)
  assert float(out[3].split()[0]) == pytest.approx(times_ns.sum() / 1e6,
                                                   abs=1e-3)
  report.write_text("==PROF== nothing profiled\n")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.profile_backward",
       f"--summarize={report}"], cwd=ROOT, capture_output=True, text=True,
      env=ENV, timeout=600)
  assert proc.returncode != 0 and "--csv --page raw" in proc.stderr


def test_profile_mosaic_times_builds_in_interleaved_rounds():
  """--rounds: round after round, every build once, in the given order;
  each build's samples in round order. (In a subprocess: the script's
  flags share names with the other profile scripts'.)"""
  code = """
from experiments import profile_mosaic
calls = []
def time_ms(fn, *args):
  calls.append((fn, args))
  return float(len(calls))
timed = {"cudnn": ("f0", (1,)), "dense": ("f1", (2, 3)), "0:w3": ("f2", ())}
samples = profile_mosaic.interleaved_rounds(timed, 3, time_ms)
assert calls == [("f0", (1,)), ("f1", (2, 3)), ("f2", ())] * 3, calls
assert samples == {"cudnn": [1.0, 4.0, 7.0], "dense": [2.0, 5.0, 8.0],
                   "0:w3": [3.0, 6.0, 9.0]}, samples
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
      proc.stdout[-2000:] + proc.stderr[-4000:])


def test_bench_decode_smoke(tmp_path):
  _, result = run_with_output("bench_decode", "bench_decode.py:smoke",
                              tmp_path, "decode")
  fields = {"impl", "batch", "q_heads", "kv_heads", "seq_len", "head_dim",
            "dtype", "threshold", "sparsity", "splits", "time_us",
            "bytes_read", "effective_tbps", "read_tbps"}
  rows = result["rows"]
  assert rows and all(fields <= set(r) for r in rows)
  ours = [r for r in rows if r["impl"] == "pallas_triton"]
  assert {r["mode"] for r in ours} == set(bj.decode.MAX_MODES)
  # Skipping reads fewer bytes than the dense run of the same mode.
  for mode in bj.decode.MAX_MODES:
    rs = [r for r in ours if r["mode"] == mode and r["splits"] == 2]
    dense = [r for r in rs if not r["skip_check"]][0]
    assert dense["threshold"] == 0 and dense["sparsity"] == 0
    sparse = [r for r in rs if r["threshold"] > 0][0]
    assert sparse["bytes_read"] <= dense["bytes_read"]
  # A synthetic cache and a model's, and a λ found for the target sparsity
  # on each.
  assert {r["pattern"] for r in rows} == {"scattered", "smollm2"}
  for pattern in ("scattered", "smollm2"):
    aimed = [r for r in ours if r["pattern"] == pattern
             and r["target_sparsity"] == 0.5]
    assert aimed and all(0 < r["threshold"] < 1 for r in aimed)
  assert (tmp_path / "decode.png").stat().st_size > 10_000


def test_sparse_prefill_all_methods_small(tmp_path):
  _, result = run_with_output("sparse_prefill", "sparse_prefill.py:all,small",
                              tmp_path, "xattention")
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"dense", "blasst", "xattention", "combined"}
  assert rows["dense"]["combined_sparsity"] == 0
  assert rows["dense"]["rel_error"] < 1e-5
  assert rows["blasst"]["skip_sparsity"] > 0 == rows["blasst"]["mask_sparsity"]
  assert rows["xattention"]["mask_sparsity"] > 0.3
  for r in rows.values():
    assert len(r["per_head"]["rel_error"]) == result["shape"][2]
    assert r["combined_sparsity"] >= r["mask_sparsity"]
  assert (tmp_path / "xattention.png").stat().st_size > 10_000


def test_analyze_small_prints_table_and_writes_plots(tmp_path):
  out = run(["analyze", "--config=configs/analyze.py:small",
             f"--config.output_dir={tmp_path}"], tmp_path)
  report = json.loads((tmp_path / "analysis.json").read_text())
  layers = report["layers"]
  assert [l["name"] for l in layers] == ["layers/0", "layers/1"]
  for layer in layers:
    heads = layer["shape"]["q_heads"]
    rows = [line for line in out.splitlines()
            if line.startswith(layer["name"])]
    assert len(rows) == heads + 1          # one per head, and "all"
    sparsity = [sum(s) for s in layer["skipped_blocks"]]
    assert sparsity[0] == 0 and sparsity[-1] > 0
  pngs = sorted(p.name for p in tmp_path.glob("*.png"))
  assert {"sparsity_vs_threshold.png", "error_vs_sparsity.png",
          "sparsity_vs_context.png", "block_map_layers_0.png",
          "gap_histogram_layers_1.png"} <= set(pngs)
  assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)


def test_calibrate_small_hits_target_on_held_out(tmp_path):
  out = run(["calibrate",
             "--config=configs/calibrate.py:small",
             f"--config.output_dir={tmp_path}"], tmp_path)
  result = json.loads((tmp_path / "calibration.json").read_text())
  held_out = result["held_out"]
  assert set(held_out) == {"prefill", "decode"}
  for phase, check in held_out.items():
    assert check["target"] == result["config"]["target_sparsity"][phase]
    assert check["scale_factor"] == result["scale_factors"][phase] > 0
    assert abs(check["achieved"] - check["target"]) <= check["tolerance"]
  assert result["all_within_tolerance"]
  assert "in every phase: yes" in out
  assert (tmp_path / "calibration.png").stat().st_size > 10_000


def test_train_lm_small_finetune_trains_dense_resumes_and_plots(tmp_path):
  """`finetune,small` trains dense into WORKDIR/dense (the steps of a plain
  `small` dense run), fine-tunes from it and runs the dense control; the
  dense run then resumes from a checkpoint as a plain `small` run."""
  out = run(["train_lm", "--config=configs/train_lm.py:finetune,small",
             f"--config.workdir={tmp_path}"], tmp_path)
  assert "initialised from" in out
  dense = json.loads((tmp_path / "dense" / "log.json").read_text())
  sparse = json.loads((tmp_path / "finetune" / "log.json").read_text())
  # The dense phase learns, logs and checkpoints.
  evals = dense["evals"]
  assert dense["mode"] == "dense"
  assert [e["step"] for e in evals] == [10, 20, 30]
  losses = [e["eval_loss"] for e in evals]
  assert losses == sorted(losses, reverse=True)
  assert losses[-1] < losses[0] - 0.3 and losses[0] < 4.2  # ln(64) = 4.16
  assert all(e["sparsity"] == [0.0, 0.0] for e in evals)   # λ = 0
  assert all(e["tokens_per_s"] > 0 for e in evals)
  ckpts = tmp_path / "dense" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["step_20", "step_30"]
  assert (tmp_path / "dense" / "training.png").stat().st_size > 10_000

  assert sparse["step_offset"] == dense["evals"][-1]["step"] == 30
  assert sparse["threshold"] == {"threshold": 0.9}
  assert all(max(e["sparsity"]) > 0 for e in sparse["evals"])
  assert all("eval_loss_dense" in e for e in sparse["evals"])
  # Fine-tuning continues from the dense model: no restart from ln(vocab).
  assert sparse["evals"][0]["eval_loss"] < dense["evals"][0]["eval_loss"]
  # The dense control continues from the same checkpoint, probed at the
  # fine-tune's λ: the same skipping as the fine-tune's first evaluation
  # would see on a model that never trained with it.
  control = json.loads((tmp_path / "dense_control" / "log.json").read_text())
  assert control["step_offset"] == 30 and control["mode"] == "dense"
  # The dense phase trains with `optim`; the fine-tune and its control with
  # `finetune_optim` over it.
  cfg = dense["config"]
  assert cfg["optim"]["peak_lr"] != cfg["finetune_optim"]["peak_lr"]
  for log in (sparse, control):
    assert log["config"]["optim"] == {**cfg["optim"],
                                      **cfg["finetune_optim"]}
  assert [e["step"] for e in control["evals"]] == [
      e["step"] for e in sparse["evals"]]
  for e in control["evals"]:
    assert e["sparsity"] == [0.0, 0.0]
    assert max(e["sparsity_at_threshold"]) > 0
    assert e["eval_loss_at_threshold"] >= e["eval_loss"] - 0.05
  assert (tmp_path / "dense_vs_finetune.png").stat().st_size > 10_000
  out = run(["train_lm",
             f"--plot_logs={tmp_path}/dense/log.json,"
             f"{tmp_path}/finetune/log.json",
             f"--plot_output={tmp_path}/again.png"], tmp_path)
  assert (tmp_path / "again.png").stat().st_size > 10_000

  # Lose the dense run's last checkpoint: a plain dense run in its workdir
  # continues from step 20, with the same optimizer state and data position,
  # so it reproduces step 30.
  shutil.rmtree(ckpts / "step_30")
  out = run(["train_lm", "--config=configs/train_lm.py:small",
             f"--config.workdir={tmp_path / 'dense'}"], tmp_path)
  assert "resumed from step 20" in out
  resumed = json.loads((tmp_path / "dense" / "log.json").read_text())["evals"]
  assert [e["step"] for e in resumed] == [10, 20, 30]
  assert abs(resumed[-1]["eval_loss"] - evals[-1]["eval_loss"]) < 1e-4


def test_train_lm_small_on_text_learns_from_heldout_split(tmp_path):
  pytest.importorskip("tokenizers")
  from experiments.lm import text_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = ("the kernel skips a block when scores fall below the running "
           "max of every row in the tile").split()
  docs = {f"doc{i:02d}": " ".join(rng.choice(words, size=400)) + ".\n"
          for i in range(12)}
  data_dir = tmp_path / "data"
  manifest = text_data.write_dataset(docs, str(data_dir), vocab_size=300,
                                     heldout_fraction=0.2)
  workdir = tmp_path / "run"
  # Weighted passkey answers: the per-target weights path of the loss.
  run(["train_lm", "--config=configs/lm_small.py:small",
       f"--config.workdir={workdir}", f"--config.data.data_dir={data_dir}",
       "--config.data.passkey_answer_weight=8.0"], tmp_path)
  log = json.loads((workdir / "log.json").read_text())
  # Passkey augmentation is on by default (and needs the tokenizer).
  assert log["config"]["data"]["passkey_prob"] > 0
  assert log["config"]["data"]["passkey_answer_weight"] == 8.0
  assert log["data"]["vocab_size"] == manifest["vocab_size"]
  assert log["data"]["heldout_tokens"] == manifest["splits"]["heldout"][
      "num_tokens"]
  losses = [e["eval_loss"] for e in log["evals"]]
  assert [e["step"] for e in log["evals"]] == [10, 20]
  assert losses[-1] < losses[0] < np.log(manifest["vocab_size"]) + 0.5
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train_lm",
       "--config=configs/lm_small.py:small",
       f"--config.workdir={tmp_path / 'x'}",
       f"--config.data.data_dir={tmp_path / 'missing'}"], cwd=ROOT,
      env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  assert "run python -m experiments.prepare_text" in proc.stderr


def test_bench_multigpu_smoke(tmp_path):
  # tests/conftest.py gives the subprocess 8 CPU devices (XLA_FLAGS).
  out, result = run_with_output("bench_multigpu", "bench_multigpu.py:smoke",
                                tmp_path, "multigpu")
  assert "devices: 8" in out
  rows = result["rows"]
  assert (tmp_path / "multigpu.png").stat().st_size > 10_000
  assert all(np.isfinite(r["time_ms"]) for r in rows)
  measured = {(r["phase"], r["devices"]) for r in rows
              if r["mode"] == "measured" and r["impl"] == "bj.sharding"}
  assert measured == {(p, n) for p in ("prefill", "decode") for n in (1, 2)}
  modeled = [r for r in rows if r["mode"] == "modeled"]
  assert {r["devices"] for r in modeled} == {4}
  # A shared max skips what one device skips, on every device count.
  for phase in ("prefill", "decode"):
    one = [r for r in rows if r["phase"] == phase and r["impl"] == "bj"
           and r["threshold"] > 0][0]
    shared = [r for r in rows if r["phase"] == phase and r.get("share_max")
              and r["mode"] == "measured" and r["threshold"] > 0]
    assert one["sparsity"] > 0 and shared
    assert all(r["sparsity"] == one["sparsity"] for r in shared), (
        one["sparsity"], [r["sparsity"] for r in shared])


def _prose(seed: int, paragraphs: int) -> str:
  """Deterministic English-like paragraphs (documents split by 2 blank
  lines, the `text.source='files'` convention)."""
  rng = np.random.default_rng(seed)
  words = ("the river ran past the old mill and the children watched the "
           "water turn the wheel while their mother called them home for "
           "supper before the rain came down over the hills").split()
  docs = []
  for _ in range(paragraphs):
    sentences = [" ".join(rng.choice(words, rng.integers(6, 14))).capitalize()
                 + "." for _ in range(40)]
    docs.append(" ".join(sentences))
  return "\n\n\n".join(docs)


def test_eval_llm_and_bench_generate_small(tmp_path):
  """The real-model study and the latency benchmark on a tiny checkpoint
  they write themselves (reference attention, CPU)."""
  files = []
  for name, seed in (("eval.txt", 0), ("calibration.txt", 1)):
    path = tmp_path / name
    path.write_text(_prose(seed, 6))
    files.append(str(path))
  text = f"--config.text.files=('{files[0]}', '{files[1]}')"
  out_dir = tmp_path / "eval"
  out = run(["eval_llm", "--config=configs/eval_llm.py:small",
             text, f"--config.output_dir={out_dir}",
             "--config.context_lengths=(256,)", "--config.progress=False"],
            tmp_path)
  assert "decode method" in out
  results = json.loads((out_dir / "results.json").read_text())
  rec = results["lengths"][0]
  dense = rec["methods"][0]
  assert dense["label"] == "dense" and dense["top1_agreement"] == 1.0
  skip = [m for m in rec["methods"] if m["kind"] == "skip"]
  assert [m["sparsity"] for m in skip] == sorted(m["sparsity"] for m in skip)
  assert skip[-1]["sparsity"] > 0 and 0 < skip[-1]["top1_agreement"] <= 1
  decode = rec["decode"]["methods"]
  assert decode[0]["delta_ppl_pct"] == 0 and decode[0]["sparsity"] == 0
  assert decode[1]["kind"] == "skip" and decode[1]["sparsity"] > 0
  assert rec["decode"]["num_splits"] >= 1
  assert results["data"]["eval"]["text"] == files[0]
  for png in results["plots"]:
    assert (out_dir / png).stat().st_size > 10_000

  gen_dir = tmp_path / "gen"
  out = run(["bench_generate",
             "--config=configs/bench_generate.py:small", text,
             f"--config.output_dir={gen_dir}", "--config.batch_sizes=(1,)",
             "--config.repeats=1", "--config.points=()",
             f"--config.from_results={out_dir / 'results.json'}"], tmp_path)
  assert "device_kind=cpu" in out
  result = json.loads((gen_dir / "generate_cpu.json").read_text())
  labels = [r["label"] for r in result["rows"]]
  assert labels == ["dense", "skip (≤1 % Δppl)"]     # + the calibrated point
  for r in result["rows"]:
    assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["tpot_loop_ms"] > 0
    assert 0 <= r["prefill_sparsity"] <= 1
  assert result["rows"][0]["prefill_sparsity"] == 0
  assert result["rows"][1]["prefill_sparsity"] > 0
  assert (gen_dir / "generate_cpu.png").stat().st_size > 10_000


def test_decode_xla_ops_lists_the_entry_kernels():
  """`decode_xla_ops.entry_ops` keeps the computations XLA launches and
  drops parameters, bitcasts and tuple reads (here XLA:CPU's HLO)."""
  from experiments import decode_xla_ops  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(lambda x, y: (jnp.sin(x) * 2, y.reshape(-1) + 1)).lower(
      jnp.ones((4, 8)), jnp.ones((2, 3))).compile()
  ops = decode_xla_ops.entry_ops(compiled)
  assert ops and not any("parameter(" in o or "metadata=" in o for o in ops)
  assert any("fusion(" in o or "sine" in o for o in ops)


def test_decode_table_cells_come_from_the_study_rows():
  """`decode_table` picks each cell's row (baseline, dense, FP8, skip
  check, target sparsity, in the asked max_mode: the study runs several)
  and divides the right times: checked on random rows."""
  from experiments import decode_table  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows, want, want_check = [], {}, {}
  for pattern, b, s in (("sink_local", 8, 32768), ("scattered", 8, 32768),
                        ("smollm2", 120, 8192)):
    base = dict(pattern=pattern, batch=b, seq_len=s, head_dim=128,
                q_heads=32, kv_heads=8)
    def add(impl, mode, fp8=False, check=False, target=None):
      row = dict(base, impl=impl, mode=mode, skip_check=check,
                 target_sparsity=target,
                 time_us=float(rng.uniform(100, 500)),
                 effective_tbps=float(rng.uniform(1, 6)),
                 sparsity=target or 0.0,
                 cache_dtype="float8_e4m3fn" if fp8 else "bfloat16")
      rows.append(row)
      return row
    baselines = [add("copy", "dense"), add("cudnn", "dense")]
    for mode in ("split", "anchored"):   # split: rows the table must skip
      triton = add("pallas_triton", mode)
      dense = add("pallas_mosaic", mode)
      fp8 = add("pallas_mosaic", mode, fp8=True)
      check = add("pallas_mosaic", mode, check=True)
      skips = [add("pallas_mosaic", mode, check=True, target=t)
               for t in decode_table.TARGETS]
      add("pallas_mosaic", mode, fp8=True, check=True, target=0.5)
    t = lambda r: r["time_us"]  # pylint: disable=unnecessary-lambda-assignment
    want[pattern] = [
        f"{t(r):.0f} ({r['effective_tbps']:.2f})"
        for r in (baselines[1], triton, dense)] + [
            f"{t(r):.0f} ({t(dense) / t(r):.2f}×)" for r in (fp8, *skips)]
    want_check[pattern] = f"{t(check):.0f} ({t(dense) / t(check):.2f}×)"
  rng.shuffle(rows)
  table = decode_table.main_table(rows, "scattered").splitlines()
  assert len(table) == 2 + 2   # header, rule, scattered, smollm2
  for line, pattern in zip(table[2:], ("scattered", "smollm2")):
    cells = line.strip("| ").split(" | ")
    assert cells[1:] == want[pattern]
  assert table[3].startswith("| SmolLM2-135M's caches: batch 120, 8k")
  detail = decode_table.detail_table(rows).splitlines()
  assert len(detail) == 2 + 3
  for line, pattern in zip(detail[2:], ("sink_local", "scattered",
                                        "smollm2")):
    assert line.split(" | ")[3] == want_check[pattern]


def test_decode_ptxas_reads_the_report_and_captures_file_descriptors():
  """`decode_ptxas` takes the largest kernel's registers and spills from
  ptxas' report, says when there is none, and captures what is written to
  the process' file descriptors (where ptxas' report goes)."""
  from experiments import decode_ptxas  # pylint: disable=g-import-not-at-top
  regs, spill = np.random.default_rng(1).integers(40, 255, size=2)
  # A small kernel with the larger stack frame first: its numbers must not
  # be paired with the large kernel's.
  report = (
      "    512 bytes stack frame, 300 bytes spill stores, 0 bytes spill "
      "loads\nptxas info    : Used 12 registers, used 1 barriers\n"
      f"    {spill + 8} bytes stack frame, {spill} bytes spill stores, "
      f"{spill + 4} bytes spill loads\n"
      f"ptxas info    : Used {regs} registers, used 16 barriers\n")
  assert decode_ptxas.ptxas_report(report) == dict(
      registers=regs, stack=spill + 8, spill_stores=spill,
      spill_loads=spill + 4)
  with pytest.raises(ValueError, match="MOSAIC_GPU_DUMP_PTXAS"):
    decode_ptxas.ptxas_report("compiled\n")
  out = []
  with decode_ptxas.captured_output(out):
    os.write(1, b"to stdout ")
    os.write(2, b"to stderr")
  assert out == ["to stdout to stderr"]


def test_gpu_timeline_reads_the_busiest_stream_and_splits_the_calls():
  """`gpu_timeline` keeps the kernels of the GPU stream with the most of
  them (not the host's events, not a quieter stream), and `summarize` gives
  each kernel of a call its median duration and gap: random timelines."""
  from experiments import gpu_timeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  durs, gaps = rng.uniform(1, 300, size=3), rng.uniform(0.5, 20, size=3)
  calls, events, t = 7, [], 0.0
  for _ in range(calls):
    for i in range(3):
      t += gaps[i]
      events.append(dict(ph="X", pid=2, tid=5, ts=t, dur=durs[i],
                         name=f"kernel_{i}"))
      t += durs[i]
  events += [dict(ph="X", pid=2, tid=6, ts=1.0, dur=2.0, name="memcpy"),
             dict(ph="X", pid=1, tid=1, ts=0.0, dur=9e3, name="python"),
             dict(ph="X", pid=1, tid=1, ts=1.0, dur=1.0, name="host")] * 9
  rng.shuffle(events)
  meta = [dict(ph="M", pid=2, name="process_name",
               args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, name="process_name",
               args=dict(name="/host:CPU")),
          dict(ph="M", pid=1, tid=1, name="thread_name",
               args=dict(name="Stream python")),
          dict(ph="M", pid=2, tid=5, name="thread_name",
               args=dict(name="Stream #14(Compute)")),
          dict(ph="M", pid=2, tid=6, name="thread_name",
               args=dict(name="Stream #15(MemcpyD2D)"))]
  kernels = gpu_timeline.stream_kernels(dict(traceEvents=meta + events))
  assert [k.name for k in kernels] == ["kernel_0", "kernel_1",
                                       "kernel_2"] * calls
  summary = gpu_timeline.summarize(kernels, calls)
  np.testing.assert_allclose([r["dur_us"] for r in summary["kernels"]], durs)
  np.testing.assert_allclose(
      [r["gap_before_us"] for r in summary["kernels"]], gaps)
  np.testing.assert_allclose(summary["period_us"], durs.sum() + gaps.sum())
  assert "gaps" in gpu_timeline.format_summary(summary)
  with pytest.raises(ValueError, match="do not split"):
    gpu_timeline.summarize(kernels[:-1], calls)
  # The host's: "python" 9 x 9e3 (more than once a call), "host" 9 x 1;
  # not the GPU's kernels.
  host = gpu_timeline.host_events(dict(traceEvents=meta + events), calls)
  assert [r["name"] for r in host] == ["python", "host"]
  np.testing.assert_allclose(host[0]["us_per_call"], 9 * 9e3 / calls)
  assert host[1]["dur_us"] == 1.0 and "python" in gpu_timeline.format_host(
      host)
  with pytest.raises(RuntimeError, match="Stream #14"):
    gpu_timeline.stream_kernels(dict(traceEvents=meta))


def test_median_time_ms_until_issued_stops_before_the_wait():
  """The wait (here a result whose `block_until_ready` takes 20 ms) counts
  in the wall time of a call, not in the host's time to issue one."""
  import time  # pylint: disable=g-import-not-at-top
  from blasst_jax import testing  # pylint: disable=g-import-not-at-top

  class SlowResult:
    def block_until_ready(self):
      time.sleep(0.02)
      return self

  fn = SlowResult
  wall = testing.median_time_ms(fn, warmup=1, iters=3, reps=2)
  issued = testing.median_time_ms(fn, warmup=1, iters=3, reps=2,
                                  until_issued=True)
  assert wall >= 20 / 2 and issued < 5
