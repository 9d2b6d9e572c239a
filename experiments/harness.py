"""The frame the benchmark scripts share: the device line, the result file
named after the device, the rows, timing, and the JSON + PNG at the end.

    bench = harness.start(cfg, dtype=cfg.dtype, rows=[])
    for row in measure(cfg, bench.on_gpu):
      bench.add(row, f"{row['impl']}: {row['time_ms']:.3f} ms")
    bench.finish(plot)                 # plot(result, png_path)

A config gives `output_dir`, `output_name` and `stem` (configs/common.py's
`result_files`), and `warmup` and `iters` for `time_ms`. A suite split
over several runs (or re-run in part) is joined with `merge_results`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable, Hashable, Sequence

from blasst_jax import testing


@dataclasses.dataclass
class Benchmark:
  """One run of a benchmark script.

  Attributes:
    cfg: the script's config.
    on_gpu: whether the first device is a GPU (baselines like cuDNN and
      timings only make sense there).
    output: the JSON file the result goes to.
    result: what is written there: the device header, the fields given to
      `start`, then whatever the script adds.
  """

  cfg: Any
  on_gpu: bool
  output: str
  result: dict

  def add(self, row: dict, line: str) -> None:
    """Appends `row` to the result's rows and prints its line at once (a
    long run shows its progress)."""
    self.result["rows"].append(row)
    print(line, flush=True)

  def save(self, **fields) -> str:
    """Updates the result with `fields` and writes it; called after each
    slow step, so a run that dies later keeps what it measured. Returns the
    path of the PNG that goes beside the JSON."""
    self.result.update(fields)
    return testing.save_json(self.result, self.output)

  def finish(self, plot: Callable[[dict, str], None] | None = None) -> str:
    """Writes the result, then `plot(result, png_path)` if given, and says
    what it wrote. Returns the PNG path."""
    png = self.save()
    if plot is None:
      print(f"wrote {self.output}")
    else:
      plot(self.result, png)
      print(f"wrote {self.output} and {png}")
    return png


def start(cfg, *, stem: str | None = None, **fields) -> Benchmark:
  """Prints the device line and opens the result of a run.

  Args:
    cfg: a config with `output_dir` and `output_name`, and `stem` unless
      given here.
    stem: the result file's stem when the config has none.
    **fields: the result's first fields after the device header (their
      order is the JSON's).

  Returns:
    The `Benchmark`; its output is output_dir/<output_name or
    STEM_<device>>.json.
  """
  header, on_gpu = testing.announce_device()
  output = testing.result_path(cfg.output_dir, cfg.output_name,
                               stem or cfg.stem, header["device_kind"])
  return Benchmark(cfg=cfg, on_gpu=on_gpu, output=output,
                   result=dict(**header, command=command_line(), **fields))


def command_line() -> str:
  """How this run was started, `python -m experiments.NAME ARGS` (a
  result records the command that measured it)."""
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  head = f"python -m {module}" if module else f"python {sys.argv[0]}"
  return " ".join([head, *sys.argv[1:]])


def runs_of(result: dict) -> list:
  """The commands behind a result: its `runs` (a merged result) or its
  own `command`."""
  if "runs" in result:
    return list(result["runs"])
  return [result["command"]] if "command" in result else []


def merge_results(paths: Sequence[str], *,
                  row_group: Callable[[dict], Hashable],
                  check_key: Callable[[dict], Hashable] | None = None
                  ) -> dict:
  """One result from the JSON results of several runs, in order.

  A later file's rows replace every earlier row of the groups it holds
  (`row_group(row)`, e.g. one input shape), and its checks replace the
  earlier ones with the same `check_key`; the rest is kept. So a suite
  split over several commands joins into one table, and a re-run of part
  of it (one head_dim, say) updates that part in place. Fields other than
  rows and checks come from the first file, updated by the later ones;
  `runs` lists every command.

  Raises:
    ValueError: if the files were measured on different device kinds.
  """
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  kinds = {r.get("device_kind") for r in results}
  if len(kinds) > 1:
    raise ValueError(f"Results from different devices {sorted(map(str, kinds))}"
                     " do not merge: pass files measured on one device kind.")
  merged = {}
  for r in results:
    merged.update({k: v for k, v in r.items()
                   if k not in ("rows", "checks", "runs", "command")})
  rows, checks, runs = [], [], []
  for r in results:
    new_groups = {row_group(x) for x in r.get("rows", [])}
    rows = [x for x in rows if row_group(x) not in new_groups]
    rows += r.get("rows", [])
    if check_key is not None:
      new_keys = {check_key(c) for c in r.get("checks", [])}
      checks = [c for c in checks if check_key(c) not in new_keys]
    checks += r.get("checks", [])
    runs += [c for c in runs_of(r) if c not in runs]
  return dict(merged, checks=checks, rows=rows, runs=runs)


def time_ms(cfg, fn, *args, reps: int = 1) -> float:
  """Median ms of `fn(*args)` after `cfg.warmup` calls, over `cfg.iters`
  samples (`testing.median_time_ms`)."""
  return testing.median_time_ms(fn, *args, warmup=cfg.warmup,
                                iters=cfg.iters, reps=reps)


def error_text(e: Exception, limit: int = 200) -> str:
  """"Type: message", cut to `limit` characters: one line for a variant
  that failed (out of memory, a tile the compiler rejects) so that the run
  goes on."""
  return f"{type(e).__name__}: {str(e)[:limit]}"


def figure(rows: int, cols: int, figsize, **subplots):
  """(fig, axes): a pyplot-free figure, so plotting works headless and
  matplotlib is imported only by runs that plot."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(rows, cols, **subplots)


def save_figure(fig, path: str, **kwargs) -> None:
  """Lays out and writes `fig` (`plotting.save_figure`)."""
  from blasst_jax import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_figure(fig, path, **kwargs)
