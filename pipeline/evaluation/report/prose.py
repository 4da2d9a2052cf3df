"""The report's prose, kept as Markdown files in ``templates/`` next to this module (package
data). A template is wrapped for reading; :func:`prose` joins the lines of each paragraph with a
space (as Markdown renders them), so the README holds one line per paragraph."""
from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def prose(name: str) -> str:
    """The text of ``templates/<name>.md``: paragraphs separated by a blank line, each on one line,
    without the trailing newline; "" when there is no such template."""
    path = resources.files(__package__).joinpath("templates", f"{name}.md")
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8").strip()
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines())
                       for paragraph in text.split("\n\n"))
