"""The README's commands are the ones the scripts accept: every ``python ray_jobs/<job>.py ...`` line of its
bash blocks parses with that job's own parser, and the files and make targets it names exist."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import REPO_ROOT, job_parser

README = REPO_ROOT / "README.md"


def readme_job_lines() -> list[tuple[str, list[str]]]:
    """``(job, arguments)`` for each ``python ray_jobs/<job>.py`` command in the README's bash blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                match = re.fullmatch(r"ray_jobs/(\w+)\.py", word)
                if match and i > 0 and words[i - 1].startswith("python"):
                    found.append((match.group(1), words[i + 1 :]))
    return found


def test_the_readme_shows_every_job():
    assert {job for job, _ in readme_job_lines()} >= {"preprocess", "tune", "ensemble", "train", "predict"}


@pytest.mark.parametrize("job, args", readme_job_lines(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_job_commands_parse_with_the_jobs_parsers(job, args):
    job_parser(job).parse_args(args)  # SystemExit (exit code 2) on an unknown flag or a bad value


def test_linked_files_and_make_targets_exist():
    text = README.read_text()
    for link in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (REPO_ROOT / link).exists(), link
    targets = set(re.findall(r"^(\w+):", (REPO_ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"`make (\w+)`", text)) <= targets
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test")
