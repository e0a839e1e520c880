#!/usr/bin/env python3
"""Import circles between the files of each crate of the workspace, as JSON.

A file's imports are the `crate::…`, `super::…` and child-module paths in its code
(comments, doc text and `#[cfg(test)] mod tests` left out), resolved to the file of the
longest module they name. A module root using its own children is not counted, nor a
child naming an item its ancestor only re-exports. A circle is a strongly connected set of
two or more files. Usage: scripts/import-cycles.py [crate_dir…]
(default: every crate of the workspace).
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crates():
    found = [ROOT]
    for base in ("entities", "examples"):
        d = os.path.join(ROOT, base)
        if os.path.isdir(d):
            found += [os.path.join(d, c) for c in sorted(os.listdir(d))
                      if os.path.exists(os.path.join(d, c, "Cargo.toml"))]
    found.append(os.path.join(ROOT, "testkit"))
    return found


def modules(src):
    """module path (tuple) -> file"""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                path = ()
            elif rel[-1] == "mod":
                path = tuple(rel[:-1])
            else:
                path = tuple(rel)
            if path == () and rel == ["main"] and () in out:
                continue
            if path and (path[-1] == "tests" or path[-1].endswith("_tests")):
                continue  # Test modules.
            out[path] = os.path.join(dirpath, f)
    return out


COMMENT = re.compile(r"(?<![:\"])//[^\n]*")
PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def resolve(mods, base, names):
    path = list(base)
    best = None
    for n in names:
        path.append(n)
        if tuple(path) in mods:
            best = tuple(path)
        else:
            break
    return best if best is not None else (tuple(base) if tuple(base) in mods else None)


def strip(text):
    text = COMMENT.sub("", text)
    return re.sub(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{.*", "", text, flags=re.S)


def reexports(text):
    """Names a file re-exports with `pub use` (a reference to them is to their origin)."""
    names = set()
    for m in re.finditer(r"pub(?:\([a-z]+\))?\s+use\s+([^;]+);", text):
        for item in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(1).split("::")[-1] if "{" not in m.group(1) else m.group(1)[m.group(1).index("{"):]):
            names.add(item)
    return names


def refs(text, here, children):
    found = []
    for child in children:
        for _ in re.finditer(r"(?<![:\w])" + child + r"::", text):
            found.append(("self", [child]))
    for m in PATH.finditer(text):
        found.append((m.group(1), m.group(2).strip(":").split("::")))
    for m in USE_GROUP.finditer(text):
        head = m.group(2).strip(":").split("::") if m.group(2) else []
        for item in re.split(r"[,\s]+", m.group(3)):
            item = item.strip("{} ")
            if item and re.match(r"[A-Za-z_]", item):
                found.append((m.group(1), head + item.split("::")[:1]))
    return found


def graph(src):
    mods = modules(src)
    texts = {f: strip(open(f, encoding="utf-8").read()) for f in mods.values()}
    exported = {f: reexports(t) for f, t in texts.items()}
    edges = {f: set() for f in mods.values()}
    for path, f in mods.items():
        children = [m[-1] for m in mods if len(m) == len(path) + 1 and m[:len(path)] == path]
        # `super` of a file module is its parent module.
        parent = path[:-1]
        for kind, names in refs(texts[f], path, children):
            base = {"crate": (), "super": parent, "self": path}[kind]
            while names and names[0] == "super":
                base, names = base[:-1], names[1:]
            target = resolve(mods, base, names)
            if target is None or mods[target] == f:
                continue
            if target == path[:len(target)]:
                # An ancestor: an item it only re-exports belongs to the file it comes from.
                rest = names[len(target) - len(base):]
                if not rest or rest[0] in exported[mods[target]]:
                    continue
            if target[:len(path)] == path:
                continue  # A module root uses its own children: not an arrow up.
            edges[f].add(mods[target])
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main():
    dirs = [os.path.abspath(d) for d in sys.argv[1:]] or crates()
    report = {}
    for d in dirs:
        src = os.path.join(d, "src")
        if not os.path.isdir(src):
            continue
        name = os.path.relpath(d, ROOT) or "."
        report[name] = [[os.path.relpath(f, ROOT) for f in c] for c in cycles(graph(src))]
    print(json.dumps({"circles": report,
                      "total": sum(len(v) for v in report.values())}, indent=2))


if __name__ == "__main__":
    main()
