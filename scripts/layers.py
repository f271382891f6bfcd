#!/usr/bin/env python3
"""The shape of src/: import cycles between files, arrows that point up the layers, files over
700 lines and functions over 120 lines (unit tests at a file's end aside). `scripts/layers.py`
prints the figures; `--check` (run by scripts/test) fails on any of them: an import cycle
outside actors/, cluster/ and broker.rs, an arrow up the layers (ARCHITECTURE.md, "Layers"),
a file over 700 lines or a function over 120.

A file's imports are the `crate::a::b` paths it names (in `use` lines and inline), resolved to
the longest module path that is a file in src/.
"""
import os
import re
import sys
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Layers, lowest first: a module may use its own layer and those below it.
LAYERS = [
    ["protocols", "storage", "message", "metrics", "net", "queue", "secrets", "faults"],
    ["config"],
    ["actors", "cluster", "broker"],  # the broker core; cluster <-> actors is the one intended cycle
    ["live", "webhooks", "telemetry", "users"],
    ["devices", "alerts", "ops", "services"],
    ["server", "http"],
    ["dev", "main", "lib", "bin"],
]
LAYER_OF = {m: i for i, ms in enumerate(LAYERS) for m in ms}

# What is left to straighten (issue 18): `--check` fails on anything not listed here, so the
# list only shrinks. Remove an entry when its arrow or size is gone.
KNOWN_UPWARD = set()
KNOWN_BIG = set()


def modules():
    out = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            out[tuple(rel)] = path
    return out


def strip_tests(text):
    # Unit tests beside the code are not part of the layering.
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


USE_RE = re.compile(r"crate::((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*)")
BRACE_RE = re.compile(r"use\s+crate::([a-z0-9_:]+)::\{([^;]*)\};", re.S)


def imports(text, mods):
    found = set()
    paths = [m.group(1).split("::") for m in USE_RE.finditer(text)]
    for m in BRACE_RE.finditer(text):
        base = m.group(1).split("::")
        for item in re.split(r"[,\s]+", re.sub(r"\{[^}]*\}", "", m.group(2))):
            item = item.split("::")[0]
            if item and item != "self":
                paths.append(base + [item])
    for p in paths:
        for n in range(len(p), 0, -1):
            if tuple(p[:n]) in mods:
                found.add(tuple(p[:n]))
                break
    return found


def tarjan(graph):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def long_fns(text):
    """(name, lines) of functions longer than 120 lines (brace matching on the source)."""
    out = []
    lines = text.split("\n")
    i = 0
    fn_re = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+([a-z_0-9]+)")
    while i < len(lines):
        m = fn_re.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j].split("//")[0])
            depth += code.count("{") - code.count("}")
            started = started or "{" in code
            if started and depth <= 0:
                break
            if not started and code.rstrip().endswith(";"):
                break
            j += 1
        if started and j - i + 1 > 120:
            out.append((m.group(6), j - i + 1))
        i += 1
    return out


def main():
    mods = modules()
    graph = defaultdict(set)
    upward = []
    for m, path in mods.items():
        text = strip_tests(open(path).read())
        graph[m]
        for t in imports(text, mods):
            if t == m or t[: len(m)] == m or m[: len(t)] == t:
                continue  # a parent re-exporting its children, or a child using its parent
            graph[m].add(t)
            a, b = LAYER_OF.get(m[0]), LAYER_OF.get(t[0])
            if a is not None and b is not None and b > a:
                upward.append(("/".join(m), "/".join(t)))
    cycles = tarjan(graph)
    in_cycle = [c for c in cycles]
    outside = sorted({"/".join(v) for c in in_cycle for v in c if v[0] not in ("actors", "cluster", "broker")})
    big = sorted(((strip_tests(open(p).read()).count("\n"), "/".join(m)) for m, p in mods.items()), reverse=True)
    fns = sorted(((n, "/".join(m), f) for m, p in mods.items() for f, n in long_fns(strip_tests(open(p).read()))), reverse=True)
    print(f"files: {len(mods)}; import cycles: {len(in_cycle)} ({', '.join(str(len(c)) + ' files' for c in in_cycle) or 'none'})")
    print(f"files in a cycle outside actors/, cluster/ and broker: {len(outside)}")
    for f in outside:
        print(f"  {f}")
    print(f"arrows up the layers: {len(upward)}")
    for a, b in sorted(upward):
        print(f"  {a} -> {b}")
    print(f"files over 700 lines: {sum(1 for n, _ in big if n > 700)}")
    for n, f in big:
        if n > 700:
            print(f"  {f}: {n}")
    print(f"functions over 120 lines: {len(fns)}")
    for n, f, name in fns:
        print(f"  {f}::{name}: {n}")
    if "--check" in sys.argv:
        bad = [f"{a} -> {b}" for a, b in upward if (a, b) not in KNOWN_UPWARD]
        bad += [f"{f} is in an import cycle (only actors/, cluster/ and broker may be)" for f in outside]
        bad += [f"{f}: {n} lines" for n, f in big if n > 700 and f not in KNOWN_BIG]
        bad += [f"{f}::{name}: {n} lines (functions stay under 120)" for n, f, name in fns]
        if bad:
            print("FAIL: new arrows up the layers or files over 700 lines (ARCHITECTURE.md, Layers):", file=sys.stderr)
            for b in bad:
                print(f"  {b}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
