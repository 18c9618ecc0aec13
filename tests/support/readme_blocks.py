"""The code blocks of README.md, and how each is run as pasted (tests/test_readme.py, tests/test_distributed.py).

A ```python block whose first line is ``# torchrun ... FILE.py`` is a script: saved as FILE.py and run by
that command (tests/test_distributed.py, in the 2-process suite). One whose first line starts with
``# Not run by the tests:`` is shown only (it says why). Every other python block runs on its own in a
fresh interpreter, as a reader pasting it would run it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NOT_RUN = "# Not run by the tests:"
_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0] if self.code.strip() else ""

    @property
    def torchrun(self) -> Optional[list[str]]:
        """The command of a torchrun script (``["torchrun", ..., "FILE.py"]``), else None."""
        first = self.first_line
        if not first.startswith("# torchrun "):
            return None
        return shlex.split(first[2:])

    @property
    def shown_only(self) -> bool:
        return self.first_line.startswith(NOT_RUN)


def blocks(path: Path = README) -> list[Block]:
    text = path.read_text()
    return [Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _BLOCK.finditer(text)]


def python_blocks(path: Path = README) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "python"]
