"""The subset of @rules_java//java:defs.bzl that Bazel 4's @bazel_tools loads.

Each name is Bazel 4's native rule, which is what rules_java forwarded to at
the time.
"""

java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_lite_proto_library = native.java_lite_proto_library
java_package_configuration = native.java_package_configuration
java_plugin = native.java_plugin
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
