"""The package's structure (issue #14): no module touches another module's
private names. Parses every module of `fusearray` (no import, no daemon)
and fails on
(a) `x._name` where x is not `self`/`cls`, nor a class defined in the same
    module (another object's private attribute: another owner's state);
(b) `from .mod import _name` across modules (another module's private helper);
(c) `self._name` used in a module whose code never defines `_name` (a mixin
    sharing state with another module's class).
Dunder names (`__init__`) are not private; `os._exit` is the standard
library's name for an exit without cleanup.
"""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "fusearray"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules():
    for path in sorted(PKG.glob("**/*.py")):
        yield path.relative_to(PKG.parent), ast.parse(path.read_text(), str(path))


def _foreign_attributes(tree) -> list:
    """(a) and (b) of the module docstring: [(line, text)]."""
    local_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and _private(n.attr):
            v = n.value
            if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in local_classes
                                            or (v.id == "os" and n.attr == "_exit")):
                continue
            hits.append((n.lineno, ast.unparse(n)))
        if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("fusearray")):
            for a in n.names:
                if _private(a.name):
                    hits.append((n.lineno, f"from {'.' * n.level}{n.module or ''} "
                                 f"import {a.name}"))
    return hits


def _borrowed_self_names(tree) -> list:
    """(c) of the module docstring: [(line, name)]."""
    defined = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) \
                and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            defined.add(n.attr)
        elif isinstance(n, ast.Assign):
            defined.update(t.id for t in n.targets if isinstance(t, ast.Name))
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            defined.add(n.target.id)
    return sorted({(n.lineno, n.attr) for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                   and n.value.id in ("self", "cls") and _private(n.attr)
                   and n.attr not in defined})


def test_no_module_touches_another_modules_private_names():
    hits = [f"{path}:{line}: {text}" for path, tree in _modules()
            for line, text in _foreign_attributes(tree)]
    assert not hits, "private names of another owner:\n" + "\n".join(hits)


def test_no_mixins_sharing_private_state():
    hits = [f"{path}:{line}: self.{name} (not defined in this module)"
            for path, tree in _modules() for line, name in _borrowed_self_names(tree)]
    assert not hits, "private names used but defined elsewhere:\n" + "\n".join(hits)


def test_the_checker_finds_what_it_is_for():
    """The rules themselves, on small samples (so a green run means something)."""
    sample = ast.parse("import os\nclass K:\n    def f(self, o):\n"
                       "        self._mine = 1\n        o._theirs()\n        K._cls_ok\n"
                       "        self._borrowed()\n        os._exit(0)\n"
                       "from .array import _helper\n")
    assert sorted(t for _, t in _foreign_attributes(sample)) == \
        ["from .array import _helper", "o._theirs"]
    assert [n for _, n in _borrowed_self_names(sample)] == ["_borrowed"]


def test_every_package_is_installed():
    """pyproject's [tool.setuptools] packages names every package of the
    tree: an installed (non-editable) fusearray without `fusearray.store`
    could not even run `fusearray init` (the libfuse matrix's installs
    caught it once)."""
    import tomllib
    conf = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
    listed = set(conf["tool"]["setuptools"]["packages"])
    present = {".".join(p.parent.relative_to(PKG.parent).parts)
               for p in PKG.glob("**/__init__.py")}
    assert present == listed, (sorted(present), sorted(listed))
