"""The repository stands alone: no tracked text file points outside it.

Code, configs, tests, launch scripts and docs must not cite material that is not
in the repository (a sibling `shared` folder, a spec document's sections) nor an
absolute path of one machine's home or work directories. The patterns are built
by concatenation so that this file does not match them itself.
"""

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED = ("vlp", "configs", "tests", "launch", "docs", "README.md", "Makefile", "setup.cfg")

FORBIDDEN = {
    "a path into a sibling `shared` folder": re.compile(re.escape(".." + "/shared")),
    "a spec document's folder": re.compile(re.escape("shared" + "/spec")),
    "a spec section citation": re.compile("spec" + r"\s*" + "\u00a7", re.IGNORECASE),
    # A root-level work, root or home folder starting an absolute path (not a
    # relative `workdir/`, not the path of a URL).
    "an absolute machine path": re.compile(
        r"(?<![\w.~$-])/(?:wo" + "rk|ro" + "ot|ho" + r"me)(?![\w.-])"),
}


def tracked_files() -> list[str]:
  """Repository-relative paths of the checked files: tracked or not ignored by git
  (a file about to be committed counts), or every file when this is no git checkout."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard", "--", *CHECKED], cwd=REPO,
                         capture_output=True, check=True).stdout
    files = [p for p in out.decode().split("\0") if p]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
    files = []
    for top in CHECKED:
      path = os.path.join(REPO, top)
      if os.path.isfile(path):
        files.append(top)
      for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
  return sorted(f for f in files if os.path.isfile(os.path.join(REPO, f)))


def read_text(path: str) -> str | None:
  """The file's text, or None for a binary file."""
  with open(os.path.join(REPO, path), "rb") as f:
    data = f.read()
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def violations(path: str, text: str) -> list[str]:
  """`path:line: what (the match)` for every forbidden reference in `text`."""
  found = []
  for number, line in enumerate(text.splitlines(), 1):
    for what, pattern in FORBIDDEN.items():
      for match in pattern.finditer(line):
        found.append(f"{path}:{number}: {what} ({match.group(0)!r} in {line.strip()!r})")
  return found


def test_the_checked_files_are_found():
  files = tracked_files()
  for must in ("README.md", "Makefile", "setup.cfg", "vlp/__init__.py",
               "tests/test_repository.py"):
    assert must in files, f"{must} is not among the checked files of {REPO}: {files[:10]}..."


def test_no_file_references_anything_outside_the_repository():
  found = []
  for path in tracked_files():
    text = read_text(path)
    if text is not None:
      found += violations(path, text)
  assert not found, ("these lines reference material outside the repository; state the "
                     "fact itself (and point at docs/reference.md for the UNITER reference "
                     "code) instead:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "see " + ".." + "/shared/notes.md",
    "as in " + "shared" + "/spec/model.md",
    "follows Spec " + "\u00a7" + "3.1",
    "cached in " + "/ro" + "ot/.cache/x",
    "python " + "/ho" + "me/me/run.py",
    "--workdir=" + "/wo" + "rk",
])
def test_forbidden_references_are_caught(line):
  assert violations("x.py", line), f"{line!r} should be reported"


@pytest.mark.parametrize("line", [
    "--workdir=workdir/demo --config.data_dir=/mnt/shared/tfds",
    "https://example.com/home/page and /tmp/run1",
    "PartitionSpec and section 3 of docs/reference.md",
    "$HOME/vlp and ~/vlp_venv",
])
def test_ordinary_paths_pass(line):
  assert not violations("x.py", line), violations("x.py", line)
