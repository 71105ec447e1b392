"""Packaging entry point; all metadata lives in setup.cfg.

``cmdclass`` is where the build hook that places prebuilt ``llama-server`` binaries under
``llama_proc/bin/{target}/{variant}/`` plugs in; today the package carries no binaries and finds or
builds them at run time (see ``llama_proc.binaries``).
"""

from setuptools import setup

CMDCLASS: dict = {}

setup(cmdclass=CMDCLASS)
