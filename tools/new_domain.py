"""Start a new domain from tools/domain_template (common/README.md §8).

    python tools/new_domain.py NAME [--root DIR]

Writes NAME/, configs/NAME/, tests/NAME/ and mk/NAME.mk with every ``__domain__`` replaced by NAME (and
``__Domain__`` by its CamelCase). Nothing else needs an edit: packages, make targets, the demo report and
the project-wide checks find the new folder. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "domain_template"


def create_domain(name: str, root: Path = ROOT) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in sys.stdlib_module_names:
        raise SystemExit(f"error: domain name '{name}' must be a lower-case Python identifier and not a "
                         "standard-library module name")
    camel = "".join(part.capitalize() for part in name.split("_"))
    plan = []
    for src in sorted(p for p in TEMPLATE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = src.relative_to(TEMPLATE).as_posix().replace("__domain__", name)
        plan.append((src, Path(root) / rel))
    clashes = [dst for _, dst in plan if dst.exists()]
    if clashes:
        raise SystemExit(f"error: {clashes[0]} already exists; choose another name")
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text(encoding="utf-8").replace("__Domain__", camel).replace("__domain__", name)
        dst.write_text(text, encoding="utf-8")
    return [dst for _, dst in plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to write into")
    args = parser.parse_args(argv)
    for path in create_domain(args.name, args.root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
