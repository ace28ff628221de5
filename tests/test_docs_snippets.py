"""docs/*.md as a new user reads them.

* Every ``medmim ...`` command in a code block of any page parses (verb, flags) and, where it names
  a config, that config loads with the command's overrides (unknown keys, bad values fail here).
* Blocks marked cheap -- a fenced block whose info string is ``bash cheap`` or ``python cheap`` --
  are run as written, in page order, in a scratch copy of the repository root (``../shared`` is the
  real shared data; ``medmim`` and ``python`` are this checkout's). A page marks a block cheap only
  when it finishes in seconds on a 2-core CPU; small settings must be written in the doc itself.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from medmim.cli import build_parser, parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*(.*)$")
LINKED = ("configs", "bench", "scripts", "pipelines", "docs", "data_cards")  # read-only parts of the repo


def blocks(page: Path) -> list[dict]:
    """Code blocks of a page: fenced (lang, flags) and 4-space-indented ones (lang 'indented')."""
    out, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    prev_blank = True
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, lang, flags = m.group(1), m.group(2).lower(), m.group(3).split()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith(fence):
                body.append(lines[i])
                i += 1
            out.append({"lang": lang, "cheap": "cheap" in flags, "code": "\n".join(body), "line": start})
        elif lines[i].startswith("    ") and prev_blank and lines[i].strip():
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            out.append({"lang": "indented", "cheap": False, "code": "\n".join(body).rstrip(), "line": start})
            prev_blank = False
            continue
        prev_blank = not lines[i].strip()
        i += 1
    return out


def medmim_commands(code: str) -> list[list[str]]:
    """argv lists of the ``medmim`` commands in a shell snippet (continuations joined, comments cut;
    transcript lines starting with ``$ `` show errors on purpose and are left out)."""
    text = re.sub(r"\\\n\s*", " ", code)
    cmds = []
    for line in text.splitlines():
        if line.lstrip().startswith("$ "):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        seg: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", "||", ";", "|"):
                # "medmim predict: file: reason" is program output shown in a doc, not a command
                if seg and seg[0].split("/")[-1] == "medmim" and not (len(seg) > 1 and seg[1].endswith(":")):
                    cmds.append(seg[1:])
                seg = []
            else:
                seg.append(tok)
    return cmds


ALL_COMMANDS = [(p.name, b["line"], argv) for p in DOCS for b in blocks(p)
                if b["lang"] in ("bash", "sh", "shell", "console", "indented", "") for argv in medmim_commands(b["code"])]


@pytest.mark.parametrize("page,line,argv", ALL_COMMANDS, ids=[f"{p}:{n}" for p, n, _ in ALL_COMMANDS])
def test_documented_command_parses_and_its_config_loads(page, line, argv):
    from medmim.config import load_config

    try:
        args = parse_args(build_parser(), argv)
    except SystemExit as exc:
        pytest.fail(f"docs/{page}:{line}: `medmim {' '.join(argv)}` does not parse (exit {exc.code})")
    if hasattr(args, "overrides") and hasattr(args, "config"):
        config = args.config
        if getattr(args, "verb", None) == "demo" and config is None:
            config = "demo"
        load_config(config, args.overrides)  # raises ConfigError naming the key


CHEAP_PAGES = [p for p in DOCS if any(b["cheap"] for b in blocks(p))]


def test_some_pages_have_cheap_blocks():
    assert any(p.name == "data.md" for p in CHEAP_PAGES)


def _scratch_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "repo"
    root.mkdir()
    for name in LINKED:
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    shared = REPO.parent / "shared"
    if shared.exists():
        (tmp_path / "shared").symlink_to(shared)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, tail in (("python", ""), ("medmim", " -m medmim.cli")):  # wrappers: a symlink would lose the venv
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{tail} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEDMIM_QUIET": "1"}
    return root, env


@pytest.mark.slow
@pytest.mark.parametrize("page", CHEAP_PAGES, ids=[p.name for p in CHEAP_PAGES])
def test_cheap_snippets_run_as_written(page, tmp_path):
    root, env = _scratch_root(tmp_path)
    for b in blocks(page):
        if not b["cheap"]:
            continue
        if b["lang"] == "python":
            cmd = [sys.executable, "-c", b["code"]]
        elif b["lang"] in ("bash", "sh"):
            cmd = ["bash", "-e", "-o", "pipefail", "-c", b["code"]]
        else:
            pytest.fail(f"docs/{page.name}:{b['line']}: a cheap block must be bash or python, not {b['lang']!r}")
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (f"docs/{page.name}:{b['line']} failed (exit {proc.returncode}):\n"
                                      f"{b['code']}\n--- stderr ---\n{proc.stderr[-3000:]}")
