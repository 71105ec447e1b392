"""Packaging entry point; the metadata lives in setup.cfg.

Building a wheel also places ``llama-server`` for this platform under ``llama_proc/bin/``: from the
source tree, ``LLAMA_SERVER_PATH``, the user cache's build of the pinned release, a download, or a
build of the pinned source (see ``llama_proc/_build_hook.py`` for the order and the environment
variables that steer or skip it). A wheel that carries a binary is tagged ``py3-none-{platform}``;
without one it stays ``py3-none-any``.

The platform tag is the plain one (``linux_x86_64``), not manylinux: such a wheel is meant for the
machine that built it (or its twins), since a binary built here links against this system's C and
C++ runtimes. Wheels for an index would need auditwheel and a manylinux build image.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    try:
        from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]
    except ImportError:  # no wheel support at all: sdists and plain installs still work
        bdist_wheel = None  # type: ignore[assignment,misc]

HERE = Path(__file__).resolve().parent


class BuildPyWithServer(build_py):
    """``build_py`` that also places the llama-server binary into the built package."""

    def run(self) -> None:
        if not getattr(self, "editable_mode", False):
            # build/lib outlives a build: a binary an earlier build placed there must not be
            # taken for one from the source tree (build_py copies those in again just below)
            shutil.rmtree(Path(self.build_lib) / "llama_proc" / "bin", ignore_errors=True)
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds binaries at run time
        sys.path.insert(0, str(HERE))
        try:
            from llama_proc._build_hook import install_into
        except ImportError as exc:  # the build environment lacks a runtime dependency
            sys.stderr.write(f"llama-proc: warning: binary placement skipped ({exc})\n")
            return
        finally:
            sys.path.remove(str(HERE))
        install_into(Path(self.build_lib) / "llama_proc" / "bin")


CMDCLASS: dict[str, type] = {"build_py": BuildPyWithServer}

if bdist_wheel is not None:

    class BdistWheel(bdist_wheel):  # type: ignore[misc,valid-type]
        """Tag the wheel for this platform when it carries binaries."""

        def get_tag(self) -> tuple[str, str, str]:
            build_lib = Path(self.get_finalized_command("build").build_lib)
            if any((build_lib / "llama_proc" / "bin").rglob("llama-server*")):
                self.root_is_pure = False
                _, _, plat = super().get_tag()
                return "py3", "none", plat
            return super().get_tag()  # type: ignore[no-any-return]

    CMDCLASS["bdist_wheel"] = BdistWheel

setup(cmdclass=CMDCLASS)
