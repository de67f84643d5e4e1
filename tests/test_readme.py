"""The README's examples run, and the documentation's relative links resolve.

* Every ```python block of README.md is executed, in order, each in a fresh namespace:
  every block is self-contained, so a reader can paste any one of them alone. They run
  on CPU tensors where there is no GPU (the examples pick their device themselves). A
  block that raises (a syntax error, a missing name, a wrong argument, a hard-coded
  ``device="cuda"`` on a machine without one) fails its test. A block that imports
  ``transformers`` is skipped when transformers is not installed (it is in ``.[test]``).
* Every relative link, ``[text](target)`` or ``![alt](target)``, in README.md and
  docs/*.md must name an existing file, and a ``#anchor`` a heading of the target file
  with that GitHub slug. Links inside code blocks and code spans are not links.
* The README's test command is the one ``.ci/run`` runs.
"""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")


def _lines_outside_fences(text):
    """(line number, line) of the Markdown text outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opener = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and opener:
            fence = opener.group(1)
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            fence = None
        elif fence is None:
            yield number, line


def python_blocks(text):
    """[(first line number, source)] of the ```python blocks of ``text``."""
    blocks, current, start, fence = [], None, 0, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            opener = re.match(r"(```+|~~~+)\s*(\S*)", stripped)
            if opener:
                fence = opener.group(1)
                if opener.group(2).lower() in ("python", "py"):
                    current, start = [], number + 1
        elif stripped.startswith(fence) and not stripped[len(fence):].strip():
            if current is not None:
                blocks.append((start, "\n".join(current) + "\n"))
            current, fence = None, None
        elif current is not None:
            current.append(line)
    if fence is not None:
        raise ValueError("unclosed code fence")
    return blocks


def run_block(source, name):
    """Execute one example in a fresh namespace (exceptions propagate)."""
    code = compile(source, name, "exec")
    exec(code, {"__name__": "__readme_example__"})  # noqa: S102 (the README's own examples)


def github_slug(heading):
    """The anchor GitHub gives a heading (github-slugger's rule, on the rendered text)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path):
    """The set of heading anchors of a Markdown file (repeats get -1, -2, ... as on GitHub)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen, result = {}, set()
    for _, line in _lines_outside_fences(text):
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path):
    """[(line number, target)] of the relative links of a Markdown file (a link may wrap
    onto the next line; it may not cross a blank line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    outside = dict(_lines_outside_fences(text))
    lines = [outside.get(number, "") for number in range(1, len(text.splitlines()) + 1)]
    found, number = [], 1
    for paragraph in "\n".join(lines).split("\n\n"):
        # code spans hold no links; keep their newlines so line numbers stay right
        plain = re.sub(r"(`+)(.+?)\1", lambda m: "\n" * m.group(0).count("\n"), paragraph, flags=re.S)
        for match in _LINK.finditer(plain):
            target = match.group(1)
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue  # http:, https:, mailto:, ...
            found.append((number + plain.count("\n", 0, match.start()), target))
        number += paragraph.count("\n") + 2
    return found


def broken_links(path):
    """Messages for the relative links of ``path`` that do not resolve."""
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
        if not os.path.exists(dest):
            problems.append(f"{where}: no such file {os.path.relpath(dest, ROOT)}")
        elif anchor:
            if not dest.endswith(".md") or os.path.isdir(dest):
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    return problems


def _readme_text():
    with open(README, encoding="utf-8") as f:
        return f.read()


BLOCKS = python_blocks(_readme_text())


def test_readme_has_examples():
    assert len(BLOCKS) >= 3, "README.md lost its python examples"


@pytest.mark.parametrize("start,source", BLOCKS, ids=[f"README.md:{start}" for start, _ in BLOCKS])
def test_readme_example_runs(start, source):
    if re.search(r"^\s*(from|import)\s+transformers\b", source, re.M) and importlib.util.find_spec(
            "transformers") is None:
        pytest.skip("transformers is not installed")
    run_block(source, f"README.md:{start}")


def test_example_runner_fails_on_broken_examples():
    text = "intro\n```python\nx = 1\n```\n```bash\necho no\n```\n```python\nprint(undefined_name)\n```\n"
    blocks = python_blocks(text)
    assert [start for start, _ in blocks] == [3, 9]
    run_block(blocks[0][1], "ok")
    with pytest.raises(NameError):
        run_block(blocks[1][1], "missing name")
    with pytest.raises(SyntaxError):
        run_block("def f(:\n", "syntax error")


def _markdown_files():
    files = [README]
    if os.path.isdir(DOCS):
        files += sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))
    return files


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The `code` heading: yes, (really)\n\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#the-code-heading-yes-really) [ok](#page) [ok](other.md#twice-1)\n"
        "[ok](https://example.com/missing.md) `[not a link](nowhere.md)`\n"
        "```\n[not a link](nowhere.md)\n```\n"
        "[bad](missing.md) [bad](other.md#no-such-heading) ![bad](img/missing.png)\n"
        "\n"
        "`code spanning\nlines [not a link](nowhere.md)` and a link [wrapping onto\nthe next line](gone.md)\n")
    problems = broken_links(str(page))
    assert len(problems) == 4, problems
    assert "page.md:7: missing.md" in problems[0] and "#no-such-heading" in problems[1]
    assert "missing.png" in problems[2] and "page.md:10: gone.md" in problems[3]


def test_readme_test_command_is_what_ci_runs():
    command = ('pip install torch==2.13.0 setuptools wheel && pip install --no-build-isolation -e ".[test]" '
               "&& python -m pytest -q tests")
    assert f"```bash\n{command}\n```" in _readme_text()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert command in f.read().splitlines()
