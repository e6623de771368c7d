"""The house rules, checked on the source: what the project cites and how its modules depend on each other."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT_FILES = [p for top in ("advprop_tf", "configs", "tests", "tools") for p in (REPO / top).rglob("*")
                 if p.is_file() and p.suffix in (".py", ".flags", ".md")] + [REPO / "README.md"]


def test_sources_are_cited_by_what_the_project_or_the_public_holds():
    """Configs, code and tests cite the paper or the authors' repository and file, never a note that is not
    part of the project."""
    private_note = "FACTS" + ".md"
    citing = [str(p.relative_to(REPO)) for p in PROJECT_FILES if private_note in p.read_text(encoding="utf-8")]
    assert citing == []
    assert os.path.exists(REPO / "configs" / "b3.flags")  # the walk saw the project
