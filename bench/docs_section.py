"""Replace one `## ` section of a Markdown file, leaving every other section as it is.

Several bench scripts share docs/benchmarks.md; each rewrites only the section it owns:

    from docs_section import replace_section
    replace_section(ROOT / "docs" / "benchmarks.md", "## Speed vs transformers", body)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TITLE = "# Benchmarks\n"


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(heading line or '' for the preamble, text of the section including its heading)]."""
    sections: list[tuple[str, str]] = [("", "")]
    fence = False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            sections.append((line.rstrip(), ""))
        heading, body = sections[-1]
        sections[-1] = (heading, body + line)
    return sections


def replace_section(path: str | Path, heading: str, body: str) -> Path:
    """Write `heading` + `body` in place of the section with that heading (appended when missing).

    The section runs to the next `## ` heading (`###` subsections belong to it). The file is
    created with a `# Benchmarks` title if it does not exist, and replaced atomically.
    """
    path = Path(path)
    heading = heading.rstrip()
    if not heading.startswith("## "):
        raise ValueError(f"expected a level-2 heading ('## ...'), got {heading!r}")
    new = f"{heading}\n\n{body.strip()}\n\n"
    text = path.read_text(encoding="utf-8") if path.exists() else TITLE + "\n"
    sections = split_sections(text)
    for i, (h, _) in enumerate(sections):
        if h == heading:
            sections[i] = (h, new)
            break
    else:
        last_h, last = sections[-1]
        sections[-1] = (last_h, last.rstrip("\n") + "\n\n")
        sections.append((heading, new))
    out = "".join(s for _, s in sections).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish(path: str | Path, heading: str, body: str, write: bool, tag: str) -> None:
    """Write the section into `path` (and say so on stderr as `[tag]`), or print it when not `write`."""
    if not write:
        print(f"{heading}\n\n{body}")
        return
    replace_section(path, heading, body)
    print(f"[{tag}] wrote {heading!r} in {path}", file=sys.stderr)
