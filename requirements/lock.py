"""The dependency lock (requirements/lock.txt): write it from uv's output, check an environment against it.

    python requirements/lock.py prune FULL LOCK          # uv's annotated output -> the lock, without torch and what
                                                         # only torch needs (torch is the user's choice)
    python requirements/lock.py check LOCK --extras a,b  # fail unless this environment has exactly the locked versions
    python requirements/lock.py versions LOCK NAME...    # one line per package: installed version, locked version

`prune` uses the standard library only (it runs with the system Python); `check` runs inside the project's environment,
which has `packaging`.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

# Pinned only while resolving: the lock is resolved against it, but never emitted.
UNPINNED_ROOT = "torch"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?:\s*;\s*(.+))?$")
VIA_INLINE = re.compile(r"^\s+# via (\S.*)$")
VIA_ITEM = re.compile(r"^\s+#\s{3}(\S.*)$")
LEFT_OUT = "# left out: "


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_blocks(text: str) -> tuple[list[str], list[dict]]:
    """uv's output as its header lines and one block per requirement line: name, version, marker, parents, lines."""
    header: list[str] = []
    blocks: list[dict] = []
    for line in text.splitlines():
        match = REQUIREMENT.match(line)
        if match:
            name, version, marker = match.groups()
            blocks.append(
                {"name": canonical(name), "version": version, "marker": marker, "parents": set(), "lines": [line]}
            )
        elif not blocks:
            header.append(line)
        else:
            blocks[-1]["lines"].append(line)
            via = VIA_INLINE.match(line) or VIA_ITEM.match(line)
            if via:
                # "apertus-hf (pyproject.toml)" and "-c file" are roots, kept apart from package names.
                parent = via.group(1).strip()
                blocks[-1]["parents"].add(parent if " " in parent else canonical(parent))
    return header, blocks


def prune(full: Path, lock: Path) -> None:
    header, blocks = parse_blocks(full.read_text())
    names = {block["name"] for block in blocks}
    if UNPINNED_ROOT not in names:
        sys.exit(f"{full}: no {UNPINNED_ROOT} pin; resolve against one (uv pip compile -c ...)")
    torch_version = next(block["version"] for block in blocks if block["name"] == UNPINNED_ROOT)
    parents: dict[str, set[str]] = {}
    for block in blocks:
        parents.setdefault(block["name"], set()).update(block["parents"])
    # Left out: torch, and every package that all of whose dependents are left out (nvidia-*, triton, sympy, ...).
    left_out = {UNPINNED_ROOT}
    changed = True
    while changed:
        changed = False
        for name, via in parents.items():
            if name not in left_out and via and via <= left_out:
                left_out.add(name)
                changed = True
    lines = [*header]
    lines += [
        f"# {UNPINNED_ROOT} is not pinned: it is the user's choice (the Makefile's TORCH_SPEC, the CPU wheel by default).",
        f"# This set is resolved against {UNPINNED_ROOT}=={torch_version}; left out with it, as only it needs them:",
        LEFT_OUT + " ".join(sorted(left_out)),
    ]
    for block in blocks:
        if block["name"] not in left_out:
            lines.extend(block["lines"])
    text = "\n".join(lines) + "\n"
    if not lock.exists() or lock.read_text() != text:  # unchanged content keeps the mtime: no reinstall
        lock.write_text(text)
    kept = len({block["name"] for block in blocks} - left_out)
    print(f"{lock}: {kept} packages locked; left out: {' '.join(sorted(left_out))}")


def check(lock: Path, project: str, extras: list[str]) -> None:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.version import Version

    _, blocks = parse_blocks(lock.read_text())
    locked: dict[str, str] = {}
    problems: list[str] = []
    for block in blocks:
        if block["marker"] and not Marker(block["marker"]).evaluate():
            continue
        locked[block["name"]] = block["version"]
        try:
            installed = metadata.version(block["name"])
        except metadata.PackageNotFoundError:
            problems.append(f"{block['name']}: locked {block['version']}, not installed")
            continue
        if Version(installed) != Version(block["version"]):
            problems.append(f"{block['name']}: locked {block['version']}, installed {installed}")
    # A lock older than pyproject.toml: a requirement it does not pin, or pins outside pyproject's range.
    for spec in metadata.requires(project) or []:
        requirement = Requirement(spec)
        name = canonical(requirement.name)
        if name == UNPINNED_ROOT:
            continue
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra}) for extra in ["", *extras]):
            continue
        if name not in locked:
            problems.append(f"{name}: required by {project} ({spec}) but not in {lock}; run `make lock`")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{name}: {lock} pins {locked[name]}, outside {project}'s {spec}; run `make lock`")
    if problems:
        print(f"{sys.prefix} does not match {lock}:", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print(f"{sys.prefix} matches {lock} ({len(locked)} packages)")


def versions(lock: Path, names: list[str]) -> None:
    _, blocks = parse_blocks(lock.read_text()) if lock.exists() else ([], [])
    pins: dict[str, set[str]] = {}
    for block in blocks:
        pins.setdefault(block["name"], set()).add(block["version"])
    for name in names:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        pinned = " or ".join(sorted(pins.get(canonical(name), []))) or "not pinned"
        print(f"{name:<14} {installed:<16} (lock: {pinned})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prune_parser = commands.add_parser("prune")
    prune_parser.add_argument("full", type=Path)
    prune_parser.add_argument("lock", type=Path)
    check_parser = commands.add_parser("check")
    check_parser.add_argument("lock", type=Path)
    check_parser.add_argument("--project", default="apertus_hf")
    check_parser.add_argument("--extras", default="", help="the extras installed, comma-separated")
    versions_parser = commands.add_parser("versions")
    versions_parser.add_argument("lock", type=Path)
    versions_parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.command == "prune":
        prune(args.full, args.lock)
    elif args.command == "check":
        check(args.lock, args.project, [extra for extra in args.extras.split(",") if extra])
    else:
        versions(args.lock, args.names)


if __name__ == "__main__":
    main()
