"""Platform facts: target triples, variants and executable names.

Targets are named as Rust names them (``x86_64-unknown-linux-gnu``); those names are the ``{target}``
folders of the ``bin/{target}/{variant}/`` layout where executables are installed.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import sys

from .errors import ConfigError

__all__ = [
    "TARGETS",
    "VARIANTS",
    "current_target",
    "default_variant",
    "executable_name",
    "has_nvidia_driver",
    "has_vulkan_loader",
    "resolve_variant",
    "runnable_variants",
]

#: Every variant a binary can be built for.
VARIANTS: tuple[str, ...] = ("cpu", "cuda", "metal", "vulkan")

#: Targets and the variants that make sense on each.
TARGETS: dict[str, tuple[str, ...]] = {
    "x86_64-unknown-linux-gnu": ("cpu", "cuda", "vulkan"),
    "aarch64-unknown-linux-gnu": ("cpu", "cuda", "vulkan"),
    "aarch64-apple-darwin": ("metal", "cpu"),
    "x86_64-apple-darwin": ("cpu", "metal"),
    "x86_64-pc-windows-msvc": ("cpu", "cuda", "vulkan"),
    "aarch64-pc-windows-msvc": ("cpu",),
}

_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def current_target() -> str:
    """The target triple of this machine, for example ``x86_64-unknown-linux-gnu``."""
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    if sys.platform.startswith("linux"):
        return f"{arch}-unknown-linux-gnu"
    if sys.platform == "darwin":
        return f"{arch}-apple-darwin"
    if sys.platform in ("win32", "cygwin"):
        return f"{arch}-pc-windows-msvc"
    return f"{arch}-unknown-{sys.platform}"


def default_variant(target: str | None = None) -> str:
    """The variant used when none is asked for: metal on Apple silicon, cpu elsewhere."""
    target = target or current_target()
    return "metal" if target == "aarch64-apple-darwin" else "cpu"


def resolve_variant(variant: str | None) -> str:
    """The variant to use: the argument, else ``LLAMA_PROC_VARIANT``, else the default.

    :raises ConfigError: for a name that is not one of :data:`VARIANTS`.
    """
    chosen = variant or os.environ.get("LLAMA_PROC_VARIANT") or default_variant()
    chosen = chosen.strip().lower()
    if chosen not in VARIANTS:
        raise ConfigError([f"variant: {chosen!r} is not one of {', '.join(VARIANTS)}"])
    return chosen


def executable_name(name: str = "llama-server", target: str | None = None) -> str:
    """``name`` with ``.exe`` appended on Windows targets."""
    target = target or current_target()
    return name + ".exe" if "windows" in target else name


def has_nvidia_driver() -> bool:
    """True where an NVIDIA driver is loaded (Linux ``/proc/driver/nvidia``) or ``nvidia-smi`` exists."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def has_vulkan_loader() -> bool:
    """True where the Vulkan loader library can be found."""
    return ctypes.util.find_library("vulkan") is not None or ctypes.util.find_library("vulkan-1") is not None


def runnable_variants(target: str | None = None) -> list[str]:
    """The variants this machine can run, best first: cuda (with an NVIDIA driver), metal (on
    Apple), vulkan (with a Vulkan loader), then cpu."""
    target = target or current_target()
    allowed = TARGETS.get(target, ("cpu",))
    out = []
    if "cuda" in allowed and has_nvidia_driver():
        out.append("cuda")
    if "metal" in allowed and target.endswith("apple-darwin"):
        out.append("metal")
    if "vulkan" in allowed and has_vulkan_loader():
        out.append("vulkan")
    out.append("cpu")
    return out
