"""Exponentials per cycle per SM of a score tile in the Hopper kernel's
register layout: on the exp unit (`jnp.exp2`, ex2.approx), on the FMA and
integer pipes (`pallas_mosaic.exp2_on_fma`), and split between them
(`exp2_split`, the kernel's `MosaicConfig.exp2_fma_cols`).

At head_dim 64 a 64 x 128 block's two products take about 512 tensor-core
cycles of an SM and its 8192 exponentials about as many on the exp unit
(16 a cycle per SM); this measures how far moving columns to the FMA pipe
raises that rate. Each program holds `--warpgroups` 64 x 128 f32 tiles and
applies `x = 2**x - 1` `--iters` times.

    python -m experiments.bench_exp2 --output_dir=benchmarks/results
"""
import functools

from absl import app
from absl import flags
import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from blasst_jax import testing
from blasst_jax.kernels import pallas_mosaic
from experiments import harness

_ITERS = flags.DEFINE_integer("iters", 256, "Exponentials per element.")
_WARPGROUPS = flags.DEFINE_integer("warpgroups", 3, "Tiles per program.")
_PROGRAMS = flags.DEFINE_integer("programs", 132 * 8, "Programs (CTAs).")
_FMA_COLS = flags.DEFINE_list("fma_cols", ["0", "16", "32", "48", "64", "128"],
                              "Columns of 128 emulated, one row each.")
_CLOCK_GHZ = flags.DEFINE_float("clock_ghz", 1.98, "SM clock for per-cycle "
                                "rates (H100/H200 boost).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "benchmarks/results",
                                  "Where exp2_<device>.{json,png} go.")

ROWS, COLS = 64, 128   # one compute warpgroup's score tile


@functools.partial(jax.jit, static_argnames=(
    "programs", "fma_cols", "iters", "warpgroups", "interpret"))
def exp_tiles(*, programs, fma_cols, iters, warpgroups, interpret=None):
  """Each warpgroup's tile starts near -1/2 and takes `iters` rounds of
  2**x - 1 (staying in [-1, 0]); returns the row sums, f32 [programs,
  warpgroups, ROWS]."""

  def tiles(out_ref, rows_smem):
    program, wg = lax.axis_index("programs"), lax.axis_index("wg")
    start = program.astype(jnp.float32) * -1e-6 - 0.5   # not a constant
    x = plgpu.layout_cast(jnp.full((ROWS, COLS), start, jnp.float32),
                          plgpu.Layout.WGMMA)
    x = lax.fori_loop(
        0, iters, lambda _, x: pallas_mosaic.exp2_split(
            x, fma_cols, fence=interpret is not None) - 1.0, x)
    rows_smem.at[wg][...] = x.sum(axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(rows_smem.at[wg], out_ref.at[program, wg])
    plgpu.wait_smem_to_gmem(0)

  def body(out_ref):
    pl.run_scoped(functools.partial(tiles, out_ref),
                  plgpu.SMEM((warpgroups, ROWS), jnp.float32),
                  collective_axes="wg")

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((programs, warpgroups, ROWS),
                                          jnp.float32),
      grid=(programs,), grid_names=("programs",), num_threads=warpgroups,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret)()


def plot(result, path):
  fig, ax = harness.figure(1, 1, (6, 4))
  rows = result["rows"]
  ax.plot([r["fma_cols"] for r in rows],
          [r["exp2_per_cycle_per_sm"] for r in rows], marker="o")
  ax.axhline(16, color="gray", lw=0.8, ls=":")
  ax.set_xlabel(f"columns of {COLS} on the FMA pipe (exp2_fma_cols)")
  ax.set_ylabel("exponentials / cycle / SM")
  ax.set_title(f"{result['device_kind']}: a 64 x {COLS} tile's 2**x",
               fontsize=10)
  harness.save_figure(fig, path, dpi=110)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(device.device_kind, jax.__version__, flush=True)
  n, wgs, iters = _PROGRAMS.value, _WARPGROUPS.value, _ITERS.value
  sms = getattr(device, "core_count", 132)
  rows = []
  for cols in map(int, _FMA_COLS.value):
    fn = functools.partial(exp_tiles, programs=n, fma_cols=cols, iters=iters,
                           warpgroups=wgs)
    ms = testing.median_time_ms(fn, warmup=2, iters=10)
    per_cycle = n * wgs * ROWS * COLS * iters / (ms * 1e-3) / sms / (
        _CLOCK_GHZ.value * 1e9)
    rows.append(dict(fma_cols=cols, time_ms=ms,
                     exp2_per_cycle_per_sm=per_cycle))
    print(f"fma_cols={cols:3d}: {ms:.3f} ms, {per_cycle:.1f} exp2 / cycle "
          f"/ SM", flush=True)
  result = dict(device_kind=device.device_kind, jax_version=jax.__version__,
                command=harness.command_line(), programs=n, warpgroups=wgs,
                iters=iters, sms=sms, clock_ghz=_CLOCK_GHZ.value, rows=rows)
  output = testing.result_path(_OUTPUT_DIR.value, "", "exp2",
                               device.device_kind)
  png = testing.save_json(result, output)
  plot(result, png)
  print(f"wrote {output} and {png}")


if __name__ == "__main__":
  app.run(main)
