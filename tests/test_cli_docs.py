"""Every `gl-lcm` command line written in README.md and docs/ parses with the real parser, and dotted
config overrides are accepted anywhere on a command line (as users type them)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gl_lcm.cli import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `gl-lcm`) for every command line in the fenced code blocks of the docs."""
    found = []
    for doc in DOCS:
        in_block, pending = False, ""
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            text = re.sub(r"\s+#.*$", "", line)  # a trailing shell comment
            m = re.search(r"(?:^|\s)(?:gl-lcm|-m gl_lcm\.cli)\s+(.*)$", text)
            if m and not text.lstrip().startswith("#"):
                found.append((f"{doc.name}:{n}", shlex.split(m.group(1))))
    return found


LINES = documented_command_lines()


def test_the_docs_hold_command_lines():
    assert len(LINES) >= 10, LINES  # the extraction itself works (README's three commands and the usage page)


@pytest.mark.parametrize("where, argv", LINES, ids=[w for w, _ in LINES])
def test_documented_command_line_parses(where, argv):
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse's error exit
        pytest.fail(f"{where}: `gl-lcm {' '.join(argv)}` does not parse (exit {exc.code})")
    assert callable(args.func)


def test_overrides_anywhere_on_the_line():
    args = parse_args(["suppress", "films/", "-o", "soft", "--config", "configs/gl_lcm_szch.yaml",
                       "segmentation.method=unet", "checkpoints.segnet=runs/segnet/model.pt"])
    assert args.input == "films/" and args.out == "soft" and args.config == "configs/gl_lcm_szch.yaml"
    assert args.overrides == ["segmentation.method=unet", "checkpoints.segnet=runs/segnet/model.pt"]
    args = parse_args(["segment", "seed=3", "films/", "--config", "c.yaml", "-o", "out", "data.image_size=64"])
    assert args.input == "films/" and args.overrides == ["seed=3", "data.image_size=64"]
    # the value of an option is never taken for an override, whatever it looks like
    args = parse_args(["segment", "films/", "-o", "a.b=c", "--config", "c.yaml"])
    assert args.out == "a.b=c" and args.overrides == []


def test_overrides_on_a_command_without_config_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["phantoms", "--out", "x", "train.batch_size=2"])
    assert "takes no config overrides" in capsys.readouterr().err
