"""Small file operations for the Makefile, so recipes stay one python command each and run the same
under sh and cmd.exe (no rm -rf, mkdir -p or touch there).

    python tools/mk.py touch PATH
    python tools/mk.py clean            # removes runs/, caches and build leftovers (not data/ or .venv/)
    python tools/mk.py help             # prints the README's table of make targets
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLEAN = ["runs", ".pytest_cache", ".ruff_cache", "build", "dist", "imaging_pipelines.egg-info"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("touch", "clean", "help"):
        print(__doc__)
        return 2
    if argv[0] == "help":
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        section = text.split("## Make targets", 1)[-1].split("\n## ", 1)[0]
        print(section.encode(sys.stdout.encoding or "ascii", "replace").decode(sys.stdout.encoding or "ascii"))
        return 0
    if argv[0] == "touch":
        for name in argv[1:]:
            path = Path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        return 0
    for name in CLEAN:
        shutil.rmtree(ROOT / name, ignore_errors=True)
    for cache in ROOT.rglob("__pycache__"):
        if ".venv" not in cache.parts:
            shutil.rmtree(cache, ignore_errors=True)
    print("removed runs/ and caches")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
