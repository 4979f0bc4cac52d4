"""The documentation stays usable by someone who has only this repository.

* README.md, which is also the package's long description, stays within 300 lines; the rest
  belongs in docs/.
* Every relative link of README.md and docs/**/*.md (Markdown links and images, HTML `src` and
  `href`) points at a file inside the repository, and a `#heading` part at a heading of that
  page.
* No file of the repository (tracked, or new and not ignored) names a path outside it: the
  folders beside a checkout, a maintainer's private environments or wheel folder, or notes that
  are not part of the project. What such a file would cite belongs, in the project's own words,
  in docs/ (docs/development.md, "Documentation").
"""

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

# What names a path outside the repository. This file is not searched (it spells them out),
# nor .gitignore, whose job is to name what is not part of the repository.
OUTSIDE = {
    "a folder beside the checkout": r"shared/",
    "a private reference environment": r"ref-venv",
    "a local wheel folder": r"\.whl/",
    "notes outside the project": r"reference (?:doc|notes)\b",
    "a table of notes outside the project": r"table \(a\)",
}
NOT_SEARCHED = {"tests/test_docs.py", ".gitignore"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _repository_files():
  """Paths (relative, '/'-separated) of the tracked files and the new, not ignored ones."""
  try:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    pytest.skip("not a git checkout: the repository's files cannot be listed")
  return sorted({p for p in out.decode("utf-8", "replace").split("\0") if p})


def _text(path):
  """The file's text, or None for a binary file (a NUL byte in its first 8 KiB)."""
  data = path.read_bytes()
  if b"\0" in data[:8192]:
    return None
  return data.decode("utf-8", "replace")


def _markdown_files():
  return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _prose_lines(text):
  """(line number, line) outside fenced code blocks, with inline code spans blanked."""
  fenced = False
  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      fenced = not fenced
      continue
    if not fenced:
      yield number, _INLINE_CODE.sub("``", line)


def slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"`", "", heading).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(text):
  """Every heading anchor of a Markdown text; repeated headings get -1, -2, ... as on GitHub."""
  seen = {}
  out = set()
  for _, line in _prose_lines(text):
    match = _HEADING.match(line)
    if match:
      base = slug(match.group(2))
      count = seen.get(base, 0)
      seen[base] = count + 1
      out.add(base if count == 0 else f"{base}-{count}")
  return out


def broken_links(path, root=REPO):
  """['<file>:<line>: <target> (why)'] for each relative link of `path` that leads nowhere
  (outside `root`, the repository, counts as nowhere)."""
  text = path.read_text(encoding="utf-8")
  problems = []
  for number, line in _prose_lines(text):
    targets = _MD_LINK.findall(line) + _HTML_LINK.findall(line)
    for target in targets:
      if _SCHEME.match(target) or target.startswith("//"):
        continue  # a web address
      where = f"{path.relative_to(root)}:{number}: {target}"
      file_part, _, anchor = target.partition("#")
      resolved = (path.parent / file_part).resolve() if file_part else path
      if not resolved.is_relative_to(root):
        problems.append(f"{where} (leaves the repository)")
      elif not resolved.exists():
        problems.append(f"{where} (no such file)")
      elif anchor and resolved.suffix == ".md" and anchor not in anchors(
          resolved.read_text(encoding="utf-8")):
        problems.append(f"{where} (no heading #{anchor} in {resolved.relative_to(root)})")
  return problems


def outside_paths(relative, text):
  """['<file>:<line>: <what> (<match>)'] for each place `text` names a path outside."""
  found = []
  for number, line in enumerate(text.splitlines(), 1):
    for what, pattern in OUTSIDE.items():
      match = re.search(pattern, line, re.IGNORECASE)
      if match:
        found.append(f"{relative}:{number}: {what} ({match.group(0)!r})")
  return found


def test_readme_fits_in_300_lines():
  lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail into a "
      f"page of docs/ and link it")


def test_every_relative_link_leads_to_a_file_and_heading():
  assert (REPO / "docs").is_dir()
  problems = [p for path in _markdown_files() for p in broken_links(path)]
  assert not problems, "broken links:\n" + "\n".join(problems)


def test_no_file_names_a_path_outside_the_repository():
  found = []
  for relative in _repository_files():
    path = REPO / relative
    if relative in NOT_SEARCHED or not path.is_file():
      continue
    text = _text(path)
    if text is not None:
      found += outside_paths(relative, text)
  assert not found, ("paths outside the repository (write what they say into docs/ and cite "
                     "that):\n" + "\n".join(found))


def test_the_checks_see_what_they_guard(tmp_path):
  """The helpers find a missing file, a missing heading and each kind of outside path, and
  accept what is fine: web addresses, existing files and headings, code blocks."""
  assert slug("Reproducing Tables 6-8 and Fig. 13") == "reproducing-tables-6-8-and-fig-13"
  assert slug("`dhmd_jax.stats`: statistics") == "dhmd_jaxstats-statistics"
  assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
  root = tmp_path.resolve()
  (root / "docs").mkdir()
  (root / "README.md").write_text("# Title\n", encoding="utf-8")
  page = root / "docs" / "page.md"
  page.write_text("[ok](../README.md#title) [ok](#here) [web](https://example.org/x.md)\n"
                  "# Here\n[gone](missing.md) ![gone](figures/none.png) [bad](#nowhere)\n"
                  "<img src=\"figures/none.png\"> [out](../../x) [bad](../README.md#none)\n"
                  "```\n[in code](missing.md)\n```\n`[in code](missing.md)`\n",
                  encoding="utf-8")
  problems = broken_links(page, root)
  assert [p.split(": ", 1)[1] for p in problems] == [
      "missing.md (no such file)", "figures/none.png (no such file)",
      "#nowhere (no heading #nowhere in docs/page.md)", "../../x (leaves the repository)",
      "../README.md#none (no heading #none in README.md)", "figures/none.png (no such file)",
  ], problems
  for line in ("see ../shared/bench/x.sh", "~/.cache/ref-venv/bin/python", "wheels in .whl/",
               "reference doc, section 5", "the reference notes", "reference table (a)"):
    assert outside_paths("f", line), line
  for line in ("~/.cache/dhmd_jax/xla", "the shared encoder", "pyproject's .whl", "a reference",
               "docs/data.md, table 3"):
    assert not outside_paths("f", line), line
