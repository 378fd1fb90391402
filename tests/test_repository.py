"""The repository stands on its own: no code, test or README line points to a document outside it."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pointers to the developers' notes that do not ship with the repository: their folder, their file names,
# their section marks and issue numbers. (Built from pieces so that this file does not match itself.)
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "shared" + r"/[A-Za-z]", "DESIGN" + " §",
                               "zimage" + "-spec", r"\b[Ii]ssue[- #]?" + r"[0-9]", r"\bspec" + r" §"]))


def test_no_file_refers_to_documents_outside_the_repository():
    """Code, tests, docs and the README cite the paper, the README or library functions, never notes a
    reader of the repository cannot open."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if f.endswith((".py", ".md", ".txt", ".ini")) or f.startswith(".ci/"):
            for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    hits.append(f"{f}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
