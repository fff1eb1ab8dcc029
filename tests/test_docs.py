"""Docs that stay true: every flag README.md and BENCHMARKS.md write exists, the README's commands parse, and the
LICENSE and CITATION.cff are what they claim to be."""

import ast
import hashlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

import predict
from config import parse_args

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")

HAND_PARSED_FLAGS = {  # flags scripts take out of argv themselves before config.parse_args sees the rest
    "bench/extract.py": ("--bench_images",),
    "bench/extract_scale.py": ("--full",),
    "bench/validate.py": ("--grid", "--normal_classes"),
}
OTHER_TOOLS_FLAGS = {"--system-site-packages": "python -m venv", "--shm-size": "docker run"}
"""Flags of tools the docs tell how to set up, not of this project's scripts."""

APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
"""md5 of the standard Apache-2.0 text (https://www.apache.org/licenses/LICENSE-2.0.txt), appendix included."""


def doc_flags() -> dict[str, set[str]]:
    """Every --flag each doc writes."""
    return {name: set(FLAG.findall((ROOT / name).read_text())) for name in DOCS}


def main_parser_flags(capsys) -> set[str]:
    """The flags main.py's parser takes, as its --help-all lists them (every field, --no-X, its own flags)."""
    with pytest.raises(SystemExit):
        parse_args(["--help-all"], prog="main.py")
    return set(FLAG.findall(capsys.readouterr().out))


def argparse_flags(path: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in a script (its own argparse parsers)."""
    calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"]
    return {arg.value for call in calls for arg in call.args
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")}


def script_flags() -> set[str]:
    scripts = [ROOT / "predict.py", *sorted((ROOT / "bench").glob("*.py"))]
    return set().union(*(argparse_flags(path) for path in scripts), *HAND_PARSED_FLAGS.values())


def test_the_flag_sources_are_read_right(capsys):
    """The reference sets hold what the scripts define, and every allow-listed flag is still used."""
    assert {"--checkpoint", "--images", "--out", "--no-overlays"} <= argparse_flags(ROOT / "predict.py")
    assert {"--cifar10", "--seeds", "--variants"} <= argparse_flags(ROOT / "bench" / "ablation.py")
    assert {"--preset", "--config", "--help", "--help-all", "--no-cache", "--img_size"} <= main_parser_flags(capsys)
    assert "--epoch" not in main_parser_flags(capsys)
    for script, flags in HAND_PARSED_FLAGS.items():
        source = (ROOT / script).read_text()
        assert all(f'"{flag}"' in source for flag in flags), script
    written = set().union(*doc_flags().values())
    assert set(OTHER_TOOLS_FLAGS) <= written, "an allow-listed flag of another tool is no longer in the docs"


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_the_docs_write_exists(doc, capsys):
    known = main_parser_flags(capsys) | script_flags() | set(OTHER_TOOLS_FLAGS)
    assert sorted(doc_flags()[doc] - known) == []


def bash_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuations joined, comments dropped, split at && and ;."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            commands += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return commands


PLACEHOLDER = re.compile(r"\[|\$\w+|^[A-Z]$")
"""A value the reader fills in ([--option], $W, a method M): such a command is checked for its flags only, as is
one with --config (it reads a saved run); a <name> inside a path parses as any other path."""


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of the README's main.py / extractor.py / predict.py commands that parse as written."""
    found = []
    for command in bash_commands((ROOT / "README.md").read_text()):
        words = shlex.split(command)
        if len(words) >= 2 and words[0] == "python" and words[1] in ("main.py", "extractor.py", "predict.py") \
                and not any(PLACEHOLDER.search(word) for word in words[2:]) and "--config" not in words:
            found.append((words[1], words[2:]))
    return found


def test_bash_commands_are_split_as_a_shell_would():
    text = "```bash\npip install x && python main.py --a 1 \\\n    --b 2   # note\npython predict.py --c\n```\n"
    assert bash_commands(text) == ["pip install x", "python main.py --a 1 --b 2", "python predict.py --c"]
    assert PLACEHOLDER.search("[--fusion") and PLACEHOLDER.search("M") and not PLACEHOLDER.search("MVTec")


def test_the_readme_commands_parse():
    commands = readme_commands()
    assert {script for script, _ in commands} == {"main.py", "extractor.py", "predict.py"} and len(commands) >= 8
    for script, argv in commands:
        if script == "predict.py":
            predict.parse(argv)
        else:
            parse_args(argv, prog=script)


def test_license_is_the_standard_apache_2_0_text_with_its_copyright_line():
    text = (ROOT / "LICENSE").read_text()
    line = "   Copyright 2026 The SANF-AD / CFLOW-AD reference implementation authors\n"
    assert text.count(line) == 1 and text.index(line) > text.index("APPENDIX: How to apply the Apache License")
    standard = text.replace(line, "   Copyright [yyyy] [name of copyright owner]\n")
    assert hashlib.md5(standard.encode()).hexdigest() == APACHE_2_0_MD5


def test_citation_file_names_the_software_and_both_papers():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["license"] == "Apache-2.0" and citation["message"] and citation["authors"]
    papers = {reference["abbreviation"]: reference for reference in citation["references"]}
    assert set(papers) == {"SANF-AD", "CFLOW-AD"}
    assert all(paper["type"] == "conference-paper" and paper["authors"] for paper in papers.values())
    assert (papers["SANF-AD"]["year"], papers["CFLOW-AD"]["year"]) == (2023, 2022)
    assert papers["CFLOW-AD"]["title"].startswith("CFLOW-AD: Real-Time Unsupervised Anomaly Detection")
    assert [author["family-names"] for author in papers["CFLOW-AD"]["authors"]] == ["Gudovskiy", "Ishizaka", "Kozuka"]
