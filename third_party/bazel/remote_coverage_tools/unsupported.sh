#!/bin/sh
echo "bazel coverage is not supported in this workspace (offline stand-in)" >&2
exit 1
