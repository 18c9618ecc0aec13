"""``python -m mxfp8_compat``: see :mod:`mxfp8_compat.cli`."""

import sys

from .cli import main

sys.exit(main())
