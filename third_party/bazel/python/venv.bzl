"""A Python toolchain whose interpreter is the project's `.venv` Python.

jax, flax and the test tools are installed into `.venv` by `make test`; the
tests import them from there instead of Bazel fetching wheels (it cannot:
the build is offline). The interpreter path must be absolute, so a repository
rule resolves it where the workspace lies. `BLASST_PYTHON` overrides it.
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _venv_python_impl(rctx):
    python = rctx.os.environ.get("BLASST_PYTHON", "")
    if not python:
        workspace = rctx.path(Label("@//:WORKSPACE")).dirname
        python = "%s/%s" % (workspace, rctx.attr.venv_python)
    if not rctx.path(python).exists:
        fail("No Python interpreter at %s: run `make .venv/.installed` " % python +
             "(or `make test`) first, or set BLASST_PYTHON.")
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", _BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    attrs = {
        "venv_python": attr.string(
            default = ".venv/bin/python",
            doc = "Interpreter path relative to the workspace root.",
        ),
    },
    environ = ["BLASST_PYTHON"],
    local = True,
)
