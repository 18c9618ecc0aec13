"""tox inline plugin: leave the ``main`` env out of the default run, visibly, when no torchao source is given.

PyPI has no torchao nightlies, so ``main`` installs torchao from ``$MXFP8_COMPAT_TORCHAO_SRC`` (a
pytorch/ao checkout or a .tar.gz of one; tools/install_torchao_source.py). Without it, a plain
``tox`` / ``tox run-parallel`` runs every other env and says here, and again in the matrix
totals line, that ``main`` was left out and why. ``tox -e main`` still selects it explicitly
(and fails, naming the variable).
"""

from __future__ import annotations

import os
import sys

from tox.plugin import impl

SOURCE_ENV_VAR = "MXFP8_COMPAT_TORCHAO_SRC"  # tools/mxfp8_compat_dev/matrix_totals.py GATED_ENVS; a test keeps them equal
GATED_ENV = "main"


@impl
def tox_add_core_config(core_conf, state):  # noqa: ANN001 - tox's hook signature
    if os.environ.get(SOURCE_ENV_VAR, "").strip():
        return
    env_list = core_conf["env_list"]
    if GATED_ENV in env_list.envs:
        env_list.envs.remove(GATED_ENV)
        selected = getattr(state.conf.options, "env", None)  # -e: the default list only when not given
        if selected is not None and not getattr(selected, "is_default_list", True):
            return  # an explicit selection: `-e main` still runs it (and fails, naming the variable)
        print(f"tox: env {GATED_ENV!r} left out of the default run: {SOURCE_ENV_VAR} is not set "
              f"(point it at a pytorch/ao checkout or a .tar.gz of one to test torchao main)", file=sys.stderr)
