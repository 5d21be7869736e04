"""Build of randlora-core's one optional C extension, ``randlora_core._philox`` (the fused basis fill).

Everything else about the distribution is in pyproject.toml. The extension is optional: where it
cannot be compiled (no compiler, no Python headers, an unsupported toolchain) the build warns and
the package installs without it, and randlora-core generates bases with its pure-torch rule instead
(same bits, slower). Flags: ``-O3`` for a vectorised loop; ``-ffp-contract=off`` and no fast-math,
because the rule's dense value is one correctly rounded binary32 multiply; ``-pthread`` for the
fill's worker threads.
"""

from __future__ import annotations

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UNIX_COMPILE = ["-O3", "-fno-fast-math", "-ffp-contract=off"]
UNIX_LINK = ["-pthread"]


class OptionalBuildExt(build_ext):
    """``build_ext`` that picks flags by compiler and never fails the install over the extension."""

    def build_extension(self, ext: Extension) -> None:
        """Compile ``ext`` with flags for this compiler; on any failure, warn and install without it."""
        if self.compiler.compiler_type == "unix":
            ext.extra_compile_args = [*UNIX_COMPILE, *ext.extra_compile_args]
            ext.extra_link_args = [*UNIX_LINK, *ext.extra_link_args]
        try:
            super().build_extension(ext)
        except Exception as exc:  # any failure here only costs speed: the torch rule stays
            self.warn(f"randlora-core: building {ext.name} failed ({exc}); bases will use the pure-torch rule")


setup(
    ext_modules=[Extension("randlora_core._philox", ["src/randlora_core/_philox.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
