"""Install torchao from a source checkout or a .tar.gz of one into the running Python (the tox ``main`` env).

    MXFP8_COMPAT_TORCHAO_SRC=~/src/ao tox -e main                     # a clone of pytorch/ao
    MXFP8_COMPAT_TORCHAO_SRC=../shared/torchao-main-36027d8.tar.gz tox -e main   # what CI passes

PyPI carries no torchao nightlies, so torchao main comes from a source tree the user has. This
copies (or extracts) it into a scratch directory, builds it without a compiler (``USE_CPP=0``:
torchao's C++/CUDA extensions are left out, the Python prototype code the shim uses is all there)
and without build isolation (its ``setup.py`` imports torch, which must be the env's), then prints
the installed version. The version suffix is ``+git<commit>``: the checkout's ``git rev-parse``,
or the hex commit in a tarball's name (``torchao-main-36027d8.tar.gz``), else ``+src``.

A relative path is taken from the working directory (tox runs commands in the repository root).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

SOURCE_ENV_VAR = "MXFP8_COMPAT_TORCHAO_SRC"
_TARBALL = re.compile(r"\.(tar\.gz|tgz|tar)$")


class SourceError(ValueError):
    """The torchao source given is missing or not a torchao tree."""


def _git_commit(tree: Path) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and (tree / ".git").exists() else None


def unpack(source: Path, scratch: Path) -> tuple[Path, Optional[str]]:
    """Copy or extract ``source`` under ``scratch``; return the tree holding setup.py and its commit."""
    if source.is_dir() and scratch.resolve().is_relative_to(source.resolve()):
        raise SourceError(f"{SOURCE_ENV_VAR}={source}: the build directory {scratch} lies inside it")
    if source.is_dir() and not (source / "setup.py").is_file():
        raise SourceError(f"{SOURCE_ENV_VAR}={source}: no setup.py at its top: not a pytorch/ao source tree")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    if source.is_dir():
        commit = _git_commit(source)
        tree = scratch / "torchao"
        # setup.py writes build/ and *.egg-info next to itself: never into the user's checkout.
        shutil.copytree(source, tree, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    elif source.is_file() and _TARBALL.search(source.name):
        match = re.search(r"-([0-9a-f]{7,40})\.(tar\.gz|tgz|tar)$", source.name)
        commit = match.group(1) if match else None
        with tarfile.open(source) as archive:
            archive.extractall(scratch)  # noqa: S202 - the user's own torchao source
        tops = [p for p in scratch.iterdir() if p.is_dir()]
        tree = tops[0] if len(tops) == 1 and not (scratch / "setup.py").exists() else scratch
    else:
        raise SourceError(f"{SOURCE_ENV_VAR}={source}: neither a directory nor a .tar.gz/.tgz/.tar file")
    if not (tree / "setup.py").is_file() or not (tree / "version.txt").is_file():
        raise SourceError(f"{SOURCE_ENV_VAR}={source}: no setup.py and version.txt at its top: not a pytorch/ao source tree")
    return tree, commit


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/install_torchao_source.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="empty directory to build in (the tox env's tmp dir)")
    parser.add_argument("--source", default=None,
                        help=f"a pytorch/ao checkout or a .tar.gz of one (default: ${SOURCE_ENV_VAR})")
    args = parser.parse_args(argv)
    given = args.source or os.environ.get(SOURCE_ENV_VAR, "").strip()
    if not given:
        parser.error(f"no torchao source: set {SOURCE_ENV_VAR} to a pytorch/ao checkout "
                     "(git clone https://github.com/pytorch/ao) or a .tar.gz of one, or pass --source")
    source = Path(given).expanduser().resolve()
    try:
        tree, commit = unpack(source, args.scratch)
    except SourceError as error:
        parser.error(str(error))
    suffix = f"+git{commit}" if commit else "+src"
    env = dict(os.environ, USE_CPP="0", VERSION_SUFFIX=suffix)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
                    str(tree)], env=env, check=True)
    wanted = (tree / "version.txt").read_text().strip() + suffix
    # A fresh interpreter: this one's metadata cache predates the install.
    installed = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('torchao'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    print(f"torchao {installed} installed from {source}")
    if installed != wanted:
        print(f"expected torchao {wanted}, found {installed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
