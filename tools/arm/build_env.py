"""Build, cache and launch an aarch64 Python (the Raspberry Pi 4/5 64-bit userland) under qemu.

What it does:
  * builds a Debian bookworm arm64 sysroot holding ``python3.11`` and the libraries it links,
    from Debian's own packages (``apt-get download`` with a private apt state: the host's dpkg
    and its architecture list are not touched, and no root is needed);
  * installs the runtime's dependencies (``pip`` aarch64 wheels, cp311, pinned to the versions
    installed on the host so both sides run the same numpy/onnx/onnxruntime) and the project
    itself (a wheel built from the working tree, ``--no-deps``) into folders on ``PYTHONPATH``;
  * writes ``bin/python3``, a host shell script that runs the aarch64 interpreter under
    ``qemu-aarch64-static``, so that ``sys.executable`` inside the emulated process is that script
    and a child process (``measure`` runs its figures in a fresh process) is emulated too;
  * caches everything in ``${QBERT_EDGE_CACHE:-~/.cache/qbert-edge}/arm64`` (``cache_dir``),
    keyed by what went into it: a second build takes a second.

What it does not do: emulate a whole board (no kernel, no /proc of an ARM machine: qemu
user-mode passes the host's), time anything faithfully (TCG translation is many times slower than a
Cortex-A72 and does not model its caches), or build anything from source.

Two details of the emulation, both set by :func:`build` and :meth:`ArmEnv.environ`:
  * onnxruntime's CPU detection (pytorch cpuinfo) reads ``/sys/devices/system/cpu``; under
    qemu-user it would read the *host's* x86 cache topology and crash at import (seen with 1.31).
    qemu looks up absolute paths inside its ``-L`` prefix first, so the sysroot carries empty
    ``sys/devices/system/cpu/{possible,present}`` files: cpuinfo gives up cleanly and onnxruntime
    falls back to ``getauxval(AT_HWCAP)``, which qemu fills from the emulated CPU model
    (``cortex-a72``: no dot product; ``cortex-a76``: dot product; ``max``: also i8mm and SVE).
  * ``QBERT_EDGE_EMULATED`` is set to the emulated CPU so that the runtime can label RSS figures
    as including the emulator.

    python tools/arm/build_env.py                 # build (or reuse) the environment, print where it is
    python tools/arm/build_env.py --cpu cortex-a76 -- -c "import platform; print(platform.machine())"
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "qbert-edge/arm-env"
VERSION = 1

#: The emulated CPUs that matter: the Raspberry Pi 4's and the Pi 5's cores.
CPUS = {"pi4": "cortex-a72", "pi5": "cortex-a76"}
DEFAULT_CPU = CPUS["pi4"]

DEBIAN_SUITE = "bookworm"
PYTHON = "3.11"
#: python3.11 and what it links, from Debian bookworm arm64 (no dpkg, perl, or maintainer scripts:
#: the packages are only unpacked). libstdc++6/libgcc-s1 are for onnxruntime and tokenizers.
DEB_PACKAGES = (
    "libc6", "libgcc-s1", "libstdc++6", "gcc-12-base", "zlib1g", "libexpat1", "libffi8",
    "libbz2-1.0", "liblzma5", "libssl3", "libuuid1", "libncursesw6", "libtinfo6", "libreadline8",
    "libsqlite3-0", "libdb5.3", "libgdbm6", "libcrypt1", "libnsl2", "libtirpc3", "media-types",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
)
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_SOURCES = (
    "http://deb.debian.org/debian {suite} main",
    "http://deb.debian.org/debian-security {suite}-security main",
)
#: Bookworm has glibc 2.36: any of these wheel tags runs there.
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
DISTRIBUTION = "qbert-edge"
REPO = Path(__file__).resolve().parents[2]
QEMU_NAMES = ("qemu-aarch64-static", "qemu-aarch64")
QEMU_PACKAGE = "qemu-user-static"

logger = logging.getLogger("qbert_edge.arm")


class ArmEnvError(RuntimeError):
    """The host cannot build or run the aarch64 environment; the message says what to install."""


def cache_dir() -> Path:
    """``${QBERT_EDGE_CACHE:-~/.cache/qbert-edge}/arm64``: where the environment lives."""
    base = os.environ.get("QBERT_EDGE_CACHE") or "~/.cache/qbert-edge"
    return Path(base).expanduser() / "arm64"


# --------------------------------------------------------------------------- host checks

def find_qemu(install: bool = False) -> str:
    """The path of qemu's aarch64 user-mode emulator, or :class:`ArmEnvError` naming the package.

    ``install=True`` (CI on a fresh machine) first runs ``apt-get install -y qemu-user-static``
    when it is missing and this process is root with apt-get.
    """
    for name in QEMU_NAMES:
        path = shutil.which(name)
        if path:
            return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        logger.info("arm64: installing %s with apt-get", QEMU_PACKAGE)
        quiet = {"env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
        _run(["apt-get", "update", "-q"], "apt-get update", **quiet)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", QEMU_PACKAGE],
             f"apt-get install {QEMU_PACKAGE}", **quiet)
        return find_qemu(install=False)
    raise ArmEnvError(
        f"qemu-aarch64-static not found on PATH: install the Debian package {QEMU_PACKAGE} "
        f"(apt-get install -y {QEMU_PACKAGE}; Ubuntu: the same package)"
    )


def qemu_cpus(qemu: str) -> set[str]:
    """CPU models this qemu emulates (``qemu-aarch64 -cpu help``)."""
    out = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}


def check_cpu(qemu: str, cpu: str) -> None:
    """Raise :class:`ArmEnvError` if ``qemu`` does not know ``cpu``."""
    known = qemu_cpus(qemu)
    if known and cpu not in known:
        raise ArmEnvError(f"{qemu} does not emulate -cpu {cpu}; it knows: {', '.join(sorted(known))}")


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ArmEnvError(f"{name} not found: building the aarch64 root needs the Debian package {package}")
    return path


# --------------------------------------------------------------------------- the environment

@dataclass(frozen=True)
class ArmEnv:
    """A built environment: run ``python3`` of ``bin/`` as if on a Pi (see :meth:`command`)."""

    home: Path      # the cache folder
    root: Path      # the arm64 sysroot (usr/bin/python3.11, libraries)
    site: Path      # the runtime's dependencies (aarch64 wheels, unpacked)
    project: Path   # qbert_edge itself (pure Python)
    qemu: str
    packages: dict = field(default_factory=dict)   # what is installed: name -> version

    @property
    def python(self) -> Path:
        """The wrapper script: an aarch64 ``python3`` as far as the caller can tell."""
        return self.home / "bin" / "python3"

    def environ(self, cpu: str = DEFAULT_CPU, base: dict | None = None) -> dict:
        """The environment for an emulated run on ``cpu`` (inherited by child processes)."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("PYTHON", "QEMU_", "VIRTUAL_ENV", "OMP_"))}
        env.update(
            QEMU_CPU=cpu,
            QEMU_LD_PREFIX=str(self.root),
            PYTHONHOME=str(self.root / "usr"),
            PYTHONPATH=os.pathsep.join([str(self.project), str(self.site)]),
            PYTHONNOUSERSITE="1",
            PYTHONSAFEPATH="1",  # the cwd (e.g. the repo, with its own qbert_edge/) never shadows the install
            QBERT_EDGE_EMULATED=cpu,
        )
        return env

    def command(self, args: list[str]) -> list[str]:
        """``[python3, *args]``: run under :meth:`environ` (``subprocess.run(..., env=...)``)."""
        return [str(self.python), *args]

    def run(self, args: list[str], cpu: str = DEFAULT_CPU, **kwargs) -> subprocess.CompletedProcess:
        """Run the emulated Python with ``args`` on ``cpu``; keyword arguments go to ``subprocess.run``."""
        check_cpu(self.qemu, cpu)
        kwargs.setdefault("check", False)
        return subprocess.run(self.command(args), env=self.environ(cpu), **kwargs)  # noqa: PLW1510


# --------------------------------------------------------------------------- pure helpers

def runtime_requirements(distribution: str = DISTRIBUTION) -> list[str]:
    """Names of the distribution's base requirements (no extras): what a device installs.

    Read from the installed metadata, so setup.cfg stays the one place that lists them.
    """
    try:
        reqs = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ArmEnvError(f"{distribution} is not installed on the host: pip install -e . first") from None
    names = []
    for req in reqs:
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue
        names.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
    return names


def pins(names: list[str]) -> list[str]:
    """``name==version`` of each name as installed on the host (``name`` alone if not installed).

    >>> pins(["pip"])[0].startswith("pip==")
    True
    """
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def key(data) -> str:
    """A short stable hash of JSON-able ``data`` (names the cached folders).

    >>> key({"a": 1}) == key({"a": 1}) != key({"a": 2})
    True
    """
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def wrapper_script(qemu: str, root: Path) -> str:
    """The text of ``bin/python3``: the interpreter under qemu, with argv[0] = the script.

    CPU and library prefix come from ``QEMU_CPU``/``QEMU_LD_PREFIX`` (qemu reads them), so child
    processes started with ``sys.executable`` run on the same emulated CPU.
    """
    python = root / "usr" / "bin" / f"python{PYTHON}"
    return (
        "#!/bin/sh\n"
        "# aarch64 python under qemu user-mode emulation (written by tools/arm/build_env.py)\n"
        f': "${{QEMU_CPU:={DEFAULT_CPU}}}" "${{QEMU_LD_PREFIX:={root}}}"\n'
        "export QEMU_CPU QEMU_LD_PREFIX\n"
        f'exec "{qemu}" -0 "$0" "{python}" "$@"\n'
    )


# --------------------------------------------------------------------------- build steps

def _read_stamp(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    return data


def _write_stamp(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **data}, indent=2) + "\n")
    os.replace(tmp, path)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` with ``tmp`` (a reader never sees half a folder)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ArmEnvError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return proc


def _apt_options(apt: Path) -> list[str]:
    """apt-get/apt-cache options for a private arm64-only apt state under ``apt``."""
    return [
        "-o", f"Dir::State={apt / 'state'}", "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::State::status={apt / 'status'}", "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
        "-o", "Debug::NoLocking=1", "-q",
        *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []),
    ]


def build_root(home: Path) -> tuple[Path, dict]:
    """The arm64 sysroot under ``home/root`` (built once; reused while the package list is the same)."""
    root = home / "root"
    want = {"suite": DEBIAN_SUITE, "packages": sorted(DEB_PACKAGES), "python": PYTHON}
    stamp = _read_stamp(root / ".qbert-edge-root.json")
    if stamp and stamp.get("want") == want:
        return root, stamp["installed"]
    for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        _require_tool(tool, package)
    if not DEBIAN_KEYRING.exists():
        raise ArmEnvError(f"{DEBIAN_KEYRING} missing: install the Debian package debian-archive-keyring")
    logger.info(f"arm64: building the Debian {DEBIAN_SUITE} arm64 sysroot (python{PYTHON}) in {root}")
    apt = home / "apt"
    for sub in ("state", "lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "sources.list").write_text("".join(
        f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {src.format(suite=DEBIAN_SUITE)}\n" for src in DEBIAN_SOURCES))
    opts = _apt_options(apt)
    _run(["apt-get", *opts, "update"], "apt-get update (arm64 package lists)")
    debs = Path(tempfile.mkdtemp(prefix="debs.", dir=home))
    tmp_root = Path(tempfile.mkdtemp(prefix="root.", dir=home))
    try:
        _run(["apt-get", *opts, "download", *DEB_PACKAGES], "apt-get download (arm64 packages)", cwd=debs)
        installed = {}
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tmp_root)], f"dpkg-deb -x {deb.name}")
            name, version = deb.name.split("_")[:2]
            installed[name] = version.replace("%3a", ":")
        # See the module docstring: cpuinfo must not read the host's x86 topology.
        cpu = tmp_root / "sys" / "devices" / "system" / "cpu"
        cpu.mkdir(parents=True)
        (cpu / "possible").write_text("")
        (cpu / "present").write_text("")
        if sys.version_info[:2] == tuple(map(int, PYTHON.split("."))):
            # Same bytecode format: compile the stdlib here instead of under emulation.
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                            str(tmp_root / "usr" / "lib" / f"python{PYTHON}")], capture_output=True, check=False)
        _write_stamp(tmp_root / ".qbert-edge-root.json", {"want": want, "installed": installed})
        _swap_in(tmp_root, root)
    finally:
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
    return root, installed


def build_site(home: Path, requirements: list[str]) -> Path:
    """The aarch64 wheels of ``requirements`` (and their dependencies) unpacked in ``home/site-KEY``."""
    want = {"requirements": sorted(requirements), "platforms": list(WHEEL_PLATFORMS), "python": PYTHON}
    site = home / f"site-{key(want)}"
    if _read_stamp(site / ".qbert-edge-site.json"):
        return site
    logger.info(f"arm64: installing aarch64 wheels into {site}: {' '.join(requirements)}")
    tmp = Path(tempfile.mkdtemp(prefix="site.", dir=home))
    try:
        platform_args = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "--target", str(tmp), "--only-binary=:all:", *platform_args,
              "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp" + PYTHON.replace(".", ""),
              *requirements], "pip install (aarch64 wheels)")
        _write_stamp(tmp / ".qbert-edge-site.json", {"want": want})
        _swap_in(tmp, site)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in home.glob("site-*"):   # keep one: the cache is a cache
        if old != site and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return site


_PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE")
_PROJECT_DIRS = ("qbert_edge", "exporters", "runtime")


def build_project(home: Path, repo: Path = REPO) -> Path:
    """The working tree's ``qbert_edge`` (a wheel built from a clean copy, installed ``--no-deps``).

    Rebuilt every time (a few seconds): the check must run the code as it is now. The copy keeps
    stale files of a local ``build/`` folder out of the wheel.
    """
    project = home / "project"
    work = Path(tempfile.mkdtemp(prefix="project.", dir=home))
    try:
        src = work / "src"
        src.mkdir()
        for name in _PROJECT_FILES:
            if (repo / name).exists():
                shutil.copy2(repo / name, src / name)
        for name in _PROJECT_DIRS:
            shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
              "--no-build-isolation", "-w", str(work / "dist"), str(src)], "pip wheel (qbert-edge)")
        wheel = next((work / "dist").glob("*.whl"))
        target = work / "project"
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
              "--target", str(target), str(wheel)], "pip install --target (qbert-edge)")
        _swap_in(target, project)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return project


def build(home: Path | None = None, *, requirements: list[str] | None = None, project: bool = True,
          install_qemu: bool = False) -> ArmEnv:
    """Build (or reuse) the whole environment in ``home`` (default :func:`cache_dir`).

    ``install_qemu``: apt-get install qemu-user-static if it is missing (root only; see find_qemu).
    """
    qemu = find_qemu(install=install_qemu)
    home = Path(home) if home else cache_dir()
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    root, debs = build_root(home)
    requirements = pins(runtime_requirements()) if requirements is None else requirements
    site = build_site(home, requirements)
    proj = build_project(home) if project else home / "project"
    (home / "bin").mkdir(exist_ok=True)
    script = home / "bin" / "python3"
    tmp = script.with_name(".python3.tmp")
    tmp.write_text(wrapper_script(qemu, root))
    tmp.chmod(0o755)
    os.replace(tmp, script)
    logger.info(f"arm64: environment ready in {home} ({time.monotonic() - t0:.1f} s)")
    return ArmEnv(home=home, root=root, site=site, project=proj, qemu=qemu,
                  packages={"debian": debs, "wheels": requirements})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default {cache_dir()})")
    parser.add_argument("--cpu", default=DEFAULT_CPU, help="emulated CPU (pi4: cortex-a72, pi5: cortex-a76, max)")
    parser.add_argument("--install-qemu", action="store_true", help=f"apt-get install {QEMU_PACKAGE} if missing (root)")
    parser.add_argument("args", nargs="*", help="run the emulated python with these arguments (after --)")
    ns = parser.parse_args(argv)
    try:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        env = build(ns.cache, install_qemu=ns.install_qemu)
        if not ns.args:
            print(env.python)
            return 0
        return env.run(ns.args, cpu=ns.cpu).returncode
    except ArmEnvError as exc:
        print(f"tools/arm/build_env.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
