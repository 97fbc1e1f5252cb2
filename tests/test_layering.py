"""The package's layering, checked from the source with `ast` (nothing is imported).

Dependence runs one way: the low modules (errors, files, conventions, fingerprints, checkpoint and the pure torch
architectures) know nothing of the applications on top of them (pretraining, trainers, study, demo);
pretraining and trainers are two separate applications that never import each other; and no module of the package
is part of an import cycle. Every import statement counts, including imports inside functions and under
`if TYPE_CHECKING:`: a lazy import hides a cycle from the interpreter, not from a reader.

How an import becomes an edge between two modules of the package:
- `import nnunet_smit.x.y` is an edge to `nnunet_smit.x.y`;
- `from nnunet_smit.x import y` is an edge to `nnunet_smit.x.y` when that is a module, otherwise to `nnunet_smit.x`;
- relative imports are resolved against the importing module's package (`__init__.py` is the package's module);
- the implicit execution of parent packages' `__init__.py` is not an edge (otherwise every package whose
  `__init__` re-exports its submodules would be a cycle with each of them);
- an import of a name of the package that is no module of it is reported, as is a file that does not parse.
Imports by string (`importlib.import_module`) are not seen.
"""
from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path
from typing import NamedTuple


class Rule(NamedTuple):
    importer: str  # a module and everything below it, by dotted name
    forbidden: str  # must not import this module or anything below it
    reason: str
    allowed: tuple[str, ...] = ()  # exceptions inside `forbidden`


LOW = ("errors", "files", "conventions", "fingerprints", "checkpoint", "architectures")
HIGH = ("pretraining", "trainers", "study", "probe", "demo")

RULES: list[Rule] = [
    Rule(
        "nnunet_smit.architectures",
        "nnunet_smit",
        "architectures are pure torch modules: within the package they import only themselves and nnunet_smit.errors",
        allowed=("nnunet_smit.architectures", "nnunet_smit.errors"),
    ),
    Rule("nnunet_smit.pretraining", "nnunet_smit.trainers", "pretraining must not import trainers"),
    Rule("nnunet_smit.trainers", "nnunet_smit.pretraining", "trainers must not import pretraining"),
    Rule("nnunet_smit.study", "nnunet_smit.pretraining",
         "the study judges encoders through their checkpoints and the trainers, never pretraining's code"),
    Rule("nnunet_smit.probe", "nnunet_smit.pretraining",
         "the probe judges encoders through their modules and checkpoints, never pretraining's code"),
    *(
        Rule(f"nnunet_smit.{low}", f"nnunet_smit.{high}", f"{low} sits below {high} and must not import it")
        for low in LOW
        for high in HIGH
    ),
]

PACKAGE = "nnunet_smit"
PACKAGE_ROOT = Path(__file__).resolve().parents[1] / PACKAGE


# ---------------------------------------------------------------------------------------------------------------
# The checker


class Edge(NamedTuple):
    source: str  # importing module
    target: str  # imported module
    where: str  # "nnunet_smit/x/y.py:12"
    line: int


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def package_modules(package_root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package_root` (the package's own folder)."""
    modules = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = path.relative_to(package_root).with_suffix("").parts
        if any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def import_edges(package_root: Path, package: str) -> tuple[list[Edge], list[str], set[str]]:
    """Every import of a module of the package, as edges; and the problems found reading them; and the modules."""
    modules = package_modules(package_root, package)
    edges: list[Edge] = []
    problems: list[str] = []

    for module, path in modules.items():
        shown = path.relative_to(package_root.parent).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as error:
            problems.append(f"{shown}: cannot be parsed ({error})")
            continue
        own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def add(target: str, node: ast.stmt) -> None:
            where = f"{shown}:{node.lineno}"
            if target not in modules:
                problems.append(f"{where} imports {target}, which is not a module of the package")
            elif target != module:
                edges.append(Edge(module, target, where, node.lineno))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _within(alias.name, package):
                        add(alias.name, node)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = own_package.split(".")
                    if node.level - 1 >= len(base):
                        problems.append(f"{shown}:{node.lineno} has a relative import beyond the top of the package")
                        continue
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if not _within(origin, package):
                    continue
                to_origin = False
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    if alias.name != "*" and submodule in modules:
                        add(submodule, node)
                    else:
                        to_origin = True
                if to_origin:
                    add(origin, node)
    return edges, problems, set(modules)


def _cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Cycles of the import graph such that every edge that lies on some cycle is on at least one of them.

    For each such edge u -> v, the cycle is u -> v followed by a shortest path back from v to u;
    the same cycle is reported once.
    """
    graph: dict[str, dict[str, list[Edge]]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, []).append(edge)

    def shortest_path(start: str, goal: str) -> list[str] | None:
        previous: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if node == goal:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1]
            for nxt in sorted(graph.get(node, {})):
                if nxt not in previous:
                    previous[nxt] = node
                    queue.append(nxt)
        return None

    covered: set[tuple[str, str]] = set()
    seen: set[tuple[str, ...]] = set()
    cycles = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            if (source, target) in covered:
                continue
            back = shortest_path(target, source)
            if back is None:
                continue
            nodes = [source, *back]  # source -> target -> ... -> source
            steps = list(zip(nodes, nodes[1:]))
            covered.update(steps)
            start = nodes.index(min(nodes[:-1]))
            key = tuple(nodes[start:-1] + nodes[:start])
            if key in seen:
                continue
            seen.add(key)
            cycles.append([graph[a][b][0] for a, b in steps])
    return cycles


def check_layers(package_root: Path, package: str, rules: list[Rule]) -> list[str]:
    """Human-readable violations of `rules` and import cycles among the modules of the package in `package_root`."""
    edges, violations, _ = import_edges(package_root, package)
    for edge in edges:
        for rule in rules:
            if (
                _within(edge.source, rule.importer)
                and _within(edge.target, rule.forbidden)
                and not any(_within(edge.target, allowed) for allowed in rule.allowed)
            ):
                violations.append(f"{edge.where} imports {edge.target} ({rule.reason})")
    for cycle in _cycles(edges):
        path = " -> ".join([cycle[0].source] + [edge.target for edge in cycle])
        lines = {}
        for edge in cycle:
            lines[edge.source] = sorted(
                {e.line for e in edges if e.source == edge.source and e.target == edge.target}
            )
        where = "; ".join(
            f"{edge.where.rpartition(':')[0]}:{','.join(map(str, lines[edge.source]))} -> {edge.target}"
            for edge in cycle
        )
        violations.append(f"import cycle: {path} [{where}]")
    return violations


# ---------------------------------------------------------------------------------------------------------------
# The real package


def test_the_package_keeps_its_layers():
    violations = check_layers(PACKAGE_ROOT, PACKAGE, RULES)
    assert not violations, f"{len(violations)} layering violation(s):\n" + "\n".join(violations)


def test_the_rules_name_modules_of_the_package():
    """A renamed or moved module must not turn a rule silently into one that never applies."""
    modules = set(package_modules(PACKAGE_ROOT, PACKAGE))
    named = {name for rule in RULES for name in (rule.importer, rule.forbidden, *rule.allowed)}
    assert named - modules == set()


# ---------------------------------------------------------------------------------------------------------------
# The checker catches the breaks (a synthetic `nnunet_smit` in tmp_path, checked with the same RULES)

CLEAN = {
    "__init__.py": '__version__ = "0"\n',
    "errors.py": "class SMITError(Exception):\n    pass\n",
    "files.py": "from nnunet_smit.errors import SMITError\n",
    "conventions.py": "from .errors import SMITError\n",
    "fingerprints.py": "from nnunet_smit import errors\n",
    "checkpoint.py": (
        "from nnunet_smit import __version__\n"
        "from nnunet_smit.architectures.config import Config\n"
        "from nnunet_smit.files import atomic_write\n"
    ),
    "demo.py": "from nnunet_smit.pretraining import engine\nfrom nnunet_smit.trainers import Trainer\n",
    "architectures/__init__.py": "from .config import Config\nfrom nnunet_smit.architectures.net import Net\n",
    "architectures/config.py": "from nnunet_smit.errors import SMITError\nclass Config:\n    pass\n",
    "architectures/net.py": (
        "import torch\n"
        "from . import config\n"
        "def load():\n"
        "    from nnunet_smit.errors import SMITError\n"
    ),
    "pretraining/__init__.py": "",
    "pretraining/engine.py": (
        "from nnunet_smit.checkpoint import save\n"
        "from nnunet_smit.pretraining.schedules import cosine\n"
        "from ..architectures import Net\n"
    ),
    "pretraining/schedules.py": "import math\n",
    "pretraining/cli.py": "def main():\n    from nnunet_smit.pretraining import engine\n",
    "trainers/__init__.py": "from nnunet_smit.trainers.trainer import Trainer\n",
    "trainers/trainer.py": "from nnunet_smit.trainers import schedule\nfrom nnunet_smit import checkpoint\n",
    "trainers/schedule.py": "",
    "study/__init__.py": "",
    "study/arms.py": "import nnunet_smit.trainers.trainer\nimport nnunet_smit.checkpoint as checkpoint\n",
}


def _package(tmp_path: Path, **changes: str) -> Path:
    """The clean package with `changes` ({"pretraining__engine": source} writes pretraining/engine.py) applied."""
    root = tmp_path / PACKAGE
    files = dict(CLEAN)
    files.update({name.replace("__", "/") + ".py": source for name, source in changes.items()})
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))
    return root


def test_a_clean_package_reports_nothing(tmp_path):
    assert check_layers(_package(tmp_path), PACKAGE, RULES) == []


def test_architectures_importing_the_checkpoint_is_reported(tmp_path):
    root = _package(tmp_path, architectures__net="from nnunet_smit.checkpoint import save\n")
    violations = check_layers(root, PACKAGE, RULES)
    assert len(violations) == 1
    assert violations[0].startswith("nnunet_smit/architectures/net.py:1 imports nnunet_smit.checkpoint (")


def test_architectures_importing_the_package_or_other_modules_is_reported(tmp_path):
    root = _package(
        tmp_path,
        architectures__net="from .. import __version__\nfrom nnunet_smit import conventions\n",
    )
    violations = check_layers(root, PACKAGE, RULES)
    assert [v.split(" (")[0] for v in violations] == [
        "nnunet_smit/architectures/net.py:1 imports nnunet_smit",
        "nnunet_smit/architectures/net.py:2 imports nnunet_smit.conventions",
    ]


def test_pretraining_importing_trainers_is_reported_also_lazily(tmp_path):
    root = _package(
        tmp_path,
        pretraining__engine="""\
            from nnunet_smit.trainers.schedule import poly

            def build():
                if True:
                    from nnunet_smit import trainers
                    import nnunet_smit.trainers.trainer
        """,
    )
    violations = check_layers(root, PACKAGE, RULES)
    assert violations == [
        "nnunet_smit/pretraining/engine.py:1 imports nnunet_smit.trainers.schedule"
        " (pretraining must not import trainers)",
        "nnunet_smit/pretraining/engine.py:5 imports nnunet_smit.trainers (pretraining must not import trainers)",
        "nnunet_smit/pretraining/engine.py:6 imports nnunet_smit.trainers.trainer"
        " (pretraining must not import trainers)",
    ]


def test_trainers_importing_pretraining_is_reported(tmp_path):
    root = _package(tmp_path, trainers__schedule="from ..pretraining.schedules import cosine\n")
    assert check_layers(root, PACKAGE, RULES) == [
        "nnunet_smit/trainers/schedule.py:1 imports nnunet_smit.pretraining.schedules"
        " (trainers must not import pretraining)"
    ]


def test_the_study_importing_pretraining_is_reported(tmp_path):
    root = _package(tmp_path, study__arms="import nnunet_smit.trainers.trainer\nimport nnunet_smit.pretraining.cli\n")
    assert check_layers(root, PACKAGE, RULES) == [
        "nnunet_smit/study/arms.py:2 imports nnunet_smit.pretraining.cli (the study judges encoders through their "
        "checkpoints and the trainers, never pretraining's code)"
    ]


def test_a_low_module_importing_an_application_is_reported(tmp_path):
    root = _package(tmp_path, files="def f():\n    import nnunet_smit.study\n")
    assert check_layers(root, PACKAGE, RULES) == [
        "nnunet_smit/files.py:2 imports nnunet_smit.study (files sits below study and must not import it)"
    ]


def test_a_cycle_through_a_function_level_import_is_reported(tmp_path):
    # The shape of pretraining/engine.py taking a constant from pretraining/cli.py, which runs the engine.
    root = _package(
        tmp_path,
        pretraining__engine="import math\n\nfrom nnunet_smit.pretraining.cli import COMPILE_MODES\n",
        pretraining__cli='COMPILE_MODES = ("none",)\n\ndef main():\n    from nnunet_smit.pretraining import engine\n',
    )
    assert check_layers(root, PACKAGE, RULES) == [
        "import cycle: nnunet_smit.pretraining.cli -> nnunet_smit.pretraining.engine -> nnunet_smit.pretraining.cli"
        " [nnunet_smit/pretraining/cli.py:4 -> nnunet_smit.pretraining.engine;"
        " nnunet_smit/pretraining/engine.py:3 -> nnunet_smit.pretraining.cli]"
    ]


def test_a_relative_import_cycle_is_reported(tmp_path):
    root = _package(
        tmp_path,
        study__a="from . import b\n",
        study__b="from .c import thing\n",
        study__c="def f():\n    from .a import x\n    from ..study import a\n",
    )
    violations = check_layers(root, PACKAGE, RULES)
    assert violations == [
        "import cycle: nnunet_smit.study.a -> nnunet_smit.study.b -> nnunet_smit.study.c -> nnunet_smit.study.a"
        " [nnunet_smit/study/a.py:1 -> nnunet_smit.study.b; nnunet_smit/study/b.py:1 -> nnunet_smit.study.c;"
        " nnunet_smit/study/c.py:2,3 -> nnunet_smit.study.a]"
    ]


def test_a_cycle_through_a_package_init_is_reported(tmp_path):
    root = _package(tmp_path, trainers__schedule="from nnunet_smit.trainers import Trainer\n")
    violations = check_layers(root, PACKAGE, RULES)
    assert len(violations) == 1
    assert violations[0].startswith(
        "import cycle: nnunet_smit.trainers -> nnunet_smit.trainers.trainer -> nnunet_smit.trainers.schedule"
        " -> nnunet_smit.trainers ["
    )


def test_imports_of_missing_modules_and_unparsable_files_are_reported(tmp_path):
    root = _package(
        tmp_path,
        demo="def main():\n    from nnunet_smit.pretraining.gone import x\n",
        files="def broken(:\n",
    )
    violations = check_layers(root, PACKAGE, RULES)
    assert len(violations) == 2
    assert violations[0].startswith("nnunet_smit/demo.py:2 imports nnunet_smit.pretraining.gone, which is not a module")
    assert violations[1].startswith("nnunet_smit/files.py: cannot be parsed")
