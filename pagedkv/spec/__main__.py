"""`python -m pagedkv.spec [page]`: copies the rules, decisions and invariants of
`pagedkv.spec.rules` into the generated section of docs/spec.md (or `page`)."""

import sys
from pathlib import Path

from pagedkv.spec import rules

path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/spec.md")
path.write_text(rules.regenerate(path.read_text()))
