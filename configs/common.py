"""Pieces the configs share: variant names and where results go."""


def parse_variant(variant: str,
                  modes: tuple[str, ...] = ("default",)) -> tuple[str, bool]:
  """(mode, small) of a comma-separated variant such as "finetune,small".

  Args:
    variant: the text after the config file's ":" ("" or "default": the
      first mode).
    modes: the modes a variant may name (at most one); the first is the
      default.

  Returns:
    The mode and whether "small" (the CPU size of the tests) was asked for.

  Raises:
    ValueError: for an unknown part or more than one mode.
  """
  parts = [p for p in variant.split(",") if p and p != "default"]
  named = [p for p in parts if p in modes]
  if set(parts) - set(modes) - {"small"} or len(named) > 1:
    names = [repr(m) for m in modes]
    choices = " or ".join([", ".join(names[:-1]), names[-1]] if names[:-1]
                          else names)
    raise ValueError(f"Unknown variant {variant!r}: use {choices}, "
                     "optionally with ',small'.")
  return (named[0] if named else modes[0]), "small" in parts


def result_files(c, stem: str, output_dir: str) -> None:
  """Sets where a benchmark writes (experiments/harness.py):
  output_dir/<output_name or STEM_<device>>.json and the .png beside it.
  Scripts write outside benchmarks/results unless told:
  --config.output_dir=benchmarks/results refreshes the committed files."""
  c.output_dir = output_dir
  c.output_name = ""
  c.stem = stem
