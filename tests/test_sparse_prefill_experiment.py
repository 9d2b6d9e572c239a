"""experiments/sparse_prefill.py runs every method on CPU (small)."""

import json

from tests.test_experiments import run


def test_sparse_prefill_all_methods_small(tmp_path):
  output = tmp_path / "xattention.json"
  run(["experiments/sparse_prefill.py",
       "--config=configs/sparse_prefill.py:all,small",
       f"--config.output={output}"], tmp_path)
  result = json.loads(output.read_text())
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
