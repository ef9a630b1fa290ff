"""The config reference, generated from the code: every key with its default and the comment next to it.

    python -m jaxvit.config_docs > docs/config-reference.md

Defaults come from the built configs (`jaxvit.config.base_config` and each task's `default_config`); comments
come from the source lines that set the keys. The functions that build a section are followed through the
calls and dicts they assign (`c.data = default_data_config()`, `cfg.update(CONFIG_DEFAULTS)`,
`mlc.ConfigDict(dict(k=v,  # comment ...))`), so a key added the same way anywhere is found without a list here.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import io
import sys
import tokenize
from pathlib import Path
from types import ModuleType, SimpleNamespace

import ml_collections as mlc

from jaxvit import config as config_lib
from jaxvit import tasks

COMMAND = "python -m jaxvit.config_docs > docs/config-reference.md"
PACKAGE = Path(__file__).resolve().parent
CONFIG_DIRS = (PACKAGE.parent / "configs", PACKAGE / "configs")  # the config files, in the repository or packaged


# ----------------------------------------------------------------------------------------- source comments

def _comments(source: str) -> tuple[dict[int, tuple[int, str]], set[int]]:
    """Line -> (column, text) of each comment in `source`, and the lines holding nothing but a comment."""
    found, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = (tok.start[1], tok.string[1:])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return found, set(found) - code_lines


def _node_comment(node: ast.AST, comments: dict, alone: set, ends_only: bool = False) -> str:
    """The comment of a statement or entry: the comment-only lines right above it, its own trailing comments
    (of its first and last line only with `ends_only`: the lines between belong to its entries), and the
    comment-only lines below them that continue them (aligned with them, or indented after the #)."""
    above, line = [], node.lineno - 1
    while line in alone:
        above.insert(0, comments[line][1].strip())
        line -= 1
    lines = sorted({node.lineno, node.end_lineno}) if ends_only else range(node.lineno, node.end_lineno + 1)
    own = [comments[n] for n in lines if n in comments and n not in alone]
    parts = above + [text.strip() for _, text in own]
    line = node.end_lineno + 1
    while own and line in alone and (comments[line][0] == own[-1][0] or comments[line][1].startswith("  ")):
        parts.append(comments[line][1].strip())
        line += 1
    return " ".join(p for p in parts if p)


def _alone_on_lines(entry: ast.AST, siblings: list[ast.AST], opening: int) -> bool:
    """Whether a keyword / dict entry has its lines to itself (so the comments there are its own)."""
    if entry.lineno == opening:
        return False
    return not any(s is not entry and s.lineno <= entry.end_lineno and s.end_lineno >= entry.lineno for s in siblings)


def _target_path(target: ast.AST) -> str | None:
    """`c.model.arch` -> "model.arch", `c["x"]` -> "x" (the root variable dropped); None for other targets."""
    parts = []
    while True:
        if isinstance(target, ast.Attribute):
            parts.insert(0, target.attr)
            target = target.value
        elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
            parts.insert(0, str(target.slice.value))
            target = target.value
        elif isinstance(target, ast.Name):
            return ".".join(parts) if parts else None
        else:
            return None


class _Resolver:
    """Finds the source of a name used inside a function or module (local imports, module imports, own module)."""

    def __init__(self, module: ModuleType, tree: ast.AST):
        self.module = module
        self.imports = {}  # name -> (module name, attribute or None)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.imports[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name] = (a.name, None)

    def resolve(self, expr: ast.AST) -> tuple[ModuleType, str] | None:
        """`NAME` or `module.NAME` -> (defining module, NAME), when that module defines NAME at its top level."""
        if isinstance(expr, ast.Name):
            module_name, attr = self.imports.get(expr.id, (self.module.__name__, expr.id))
            if attr is None:
                return None
        elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            base = self.imports.get(expr.value.id)
            if base is None:
                return None
            module_name = base[0] if base[1] is None else f"{base[0]}.{base[1]}"
            attr = expr.attr
        else:
            return None
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        return module, attr


@functools.lru_cache(maxsize=None)
def _module_tree(module: ModuleType) -> tuple[str, ast.Module]:
    source = inspect.getsource(module)
    return source, ast.parse(source)


def _top_level(module: ModuleType, name: str) -> ast.AST | None:
    """The top-level def, class or assignment of `name` in `module` (None without one, or without source)."""
    try:
        body = _module_tree(module)[1].body
    except (OSError, TypeError):
        return None
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
    return None


def key_comments(module: ModuleType, node: ast.AST, prefix: str, out: dict[str, str], seen: set | None = None) -> None:
    """Adds "prefix + key" -> comment for every config key that `node` (a function or a dict assignment in
    `module`) sets, following the functions and dicts it builds sections from."""
    seen = set() if seen is None else seen
    if (module.__name__, node.lineno, prefix) in seen:
        return
    seen.add((module.__name__, node.lineno, prefix))
    source, tree = _module_tree(module)
    comments, alone = _comments(source)
    resolver = _Resolver(module, tree)

    def note(path: str, comment: str) -> None:
        if comment and not out.get(prefix + path):
            out[prefix + path] = comment

    def follow(value: ast.AST, path: str) -> None:
        """A section built by a call or from a dict: its keys, with `path.` in front."""
        sub = f"{path}." if path else ""
        if isinstance(value, ast.Dict):
            entries = []
            for k, v in zip(value.keys, value.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    entry = SimpleNamespace(lineno=k.lineno, end_lineno=v.end_lineno)  # the "key": value lines
                    entries.append((k.value, entry, v))
            spans = [e for _, e, _ in entries]
            for key, entry, v in entries:
                if _alone_on_lines(entry, spans, value.lineno):
                    note(sub + key, _node_comment(entry, comments, alone))
                follow(v, sub + key)
        elif isinstance(value, ast.Call):
            for kw in value.keywords:
                if kw.arg:
                    if _alone_on_lines(kw, value.keywords, value.lineno):
                        note(sub + kw.arg, _node_comment(kw, comments, alone))
                    follow(kw.value, sub + kw.arg)
            for arg in value.args:
                follow(arg, path)
            found = resolver.resolve(value.func)
            if found:
                target = _top_level(*found)
                if isinstance(target, ast.FunctionDef):
                    key_comments(found[0], target, prefix + sub, out, seen)
        elif isinstance(value, (ast.Name, ast.Attribute)):
            found = resolver.resolve(value)
            if found and (target := _top_level(*found)) is not None and not isinstance(target, ast.ClassDef):
                key_comments(found[0], target, prefix + sub, out, seen)

    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        follow(node.value, "")
        return
    for stmt in ast.walk(node):
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                pairs = (isinstance(stmt.value, ast.Tuple) and len(elements) > 1
                         and len(stmt.value.elts) == len(elements))
                values = stmt.value.elts if pairs else None
                for i, element in enumerate(elements):
                    path = _target_path(element)
                    if path is None:
                        continue
                    note(path, _node_comment(stmt, comments, alone, ends_only=True))
                    follow(values[i] if values else stmt.value, path)
        elif isinstance(stmt, ast.Call) and isinstance(stmt.func, ast.Attribute) and stmt.func.attr == "update":
            path = _target_path(stmt.func.value)  # c.data.update(...): keys of data
            if path is not None or isinstance(stmt.func.value, ast.Name):
                for arg in stmt.args:
                    follow(arg, path or "")


def function_comments(fn, prefix: str = "") -> dict[str, str]:
    """"prefix + key" -> comment for the keys that function `fn` sets ({} when its source cannot be read)."""
    fn = inspect.unwrap(fn)
    module = inspect.getmodule(fn)
    try:
        _, tree = _module_tree(module)
    except (OSError, TypeError):
        return {}
    first_line = lambda n: n.decorator_list[0].lineno if n.decorator_list else n.lineno  # noqa: E731
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn.__name__
                 and first_line(n) == fn.__code__.co_firstlineno), None)
    out: dict[str, str] = {}
    if node is not None:
        key_comments(module, node, prefix, out)
    return out


# ----------------------------------------------------------------------------------------------- defaults

def flatten(cfg: mlc.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default; an empty section (e.g. model.overrides) is one entry."""
    out = {}
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, mlc.ConfigDict) and len(value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _format(value) -> str:
    if isinstance(value, mlc.ConfigDict):
        return "{}" if not len(value) else repr(value.to_dict())
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_format(k)}: {_format(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(keys: dict[str, object], comments: dict[str, str]) -> list[str]:
    """One row per key; a section's own comment (e.g. above `c.mesh = ...`) as a row `section.*` before its keys."""
    lines, sections = ["| key | default | comment |", "|---|---|---|"], set()
    for key, value in keys.items():
        parts = key.split(".")
        for depth in range(1, len(parts)):
            section = ".".join(parts[:depth])
            if section not in sections and comments.get(section):
                lines.append(f"| `{section}.*` | | {_cell(comments[section])} |")
            sections.add(section)
        lines.append(f"| `{key}` | `{_cell(_format(value))}` | {_cell(comments.get(key, ''))} |")
    return lines


def _config_file_additions() -> list[tuple[str, dict[str, object], dict[str, str]]]:
    """(config file, keys it adds beyond base_config(its task) with their values, comments) for configs/*.py."""
    found = []
    for path in sorted(p for d in CONFIG_DIRS for p in d.glob("*.py") if p.name != "__init__.py"):
        cfg = config_lib.load_config_file(str(path))
        base = flatten(config_lib.base_config(cfg.task))
        # keys the base config lacks; entries of a base key that is an empty section (model.overrides) are not new
        added = {k: v for k, v in flatten(cfg).items()
                 if k not in base and not any(k.startswith(b + ".") for b in base)}
        if added:
            spec = importlib.util.spec_from_file_location(f"_jaxvit_config_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[module.__name__] = module  # inspect.getsource finds the file through it
            try:
                comments = function_comments(module.get_config)
            finally:
                del sys.modules[module.__name__]
            found.append((path.relative_to(PACKAGE.parent).as_posix(), added, comments))
    return found


def generate() -> str:
    base = config_lib.base_config()
    common = flatten(base)
    for name in tasks.TASKS:  # the default task's own section is listed with its task
        common = {k: v for k, v in common.items() if not k.startswith(name + ".")}
    comments = function_comments(config_lib.base_config)
    lines = [
        "# Config reference",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit by hand (a test fails when this page is stale).",
        "Every key can be overridden on the command line: `--config.KEY=VALUE`. Defaults are those of",
        "`jaxvit.config.base_config`; the files in `configs/` change some of them (the resolved config of a run is",
        "`WORKDIR/config.json`).",
        "",
        "## Common keys",
        "",
        *_table(common, comments),
    ]
    for name in tasks.TASKS:
        section = tasks.config_section(name)
        if section is None:
            continue
        fn = tasks.task_class(name).default_config
        lines += ["", f"## `{name}` task: the `{name}.*` keys", "",
                  f"Present when `task=\"{name}\"` (`{tasks.TASKS[name].split(':')[0]}`).", "",
                  *_table(flatten(section, f"{name}."), function_comments(fn, f"{name}."))]
    for file, added, file_comments in _config_file_additions():
        lines += ["", f"## Keys `{file}` adds", "", *_table(added, file_comments)]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(generate())


if __name__ == "__main__":
    main()
