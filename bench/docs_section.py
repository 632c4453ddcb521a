"""The benchmark scripts' one way of writing their results into docs/benchmarks.md: each
owns a section between `<!-- NAME:begin -->` and `<!-- NAME:end -->` and rewrites only that."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs/benchmarks.md"


def write_section(name, section):
    """Replace what stands between the `name` markers with `section` (ending in a newline)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text()
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{section}{end}",
                  text, flags=re.S)
    DOC.write_text(text)
