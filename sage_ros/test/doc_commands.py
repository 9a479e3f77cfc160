# SPDX-License-Identifier: Apache-2.0
"""The command lines of the README and docs/, as a reader would type them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def doc_files() -> list[Path]:
    return [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]


def bash_commands(text: str) -> list[str]:
    """Every command line of ``text``'s bash blocks (continuations joined, comments cut; a line
    given twice counts once)."""
    commands: list[str] = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = ' '.join(line.split('#')[0].split()) if not line.lstrip().startswith('#') else ''
            if line and line not in commands:
                commands.append(line)
    return commands
