"""The package's layering, checked from its source: layers in order, no import cycles, the search layer free of Lightning, a cheap
``import lightning_fms``, and no module over 600 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import lightning_fms

PACKAGE = Path(lightning_fms.__file__).parent
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path) -> set[str]:
    """Modules of lightning_fms imported at module level (``TYPE_CHECKING`` blocks included, function bodies not)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in module_imports(path):
            # "from pkg import sub" imports the module pkg.sub when it exists, otherwise a name of pkg
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ that re-exports its modules is not a cycle with them: drop package -> own submodule edges
    for name, targets in graph.items():
        if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists():
            graph[name] = {t for t in targets if not t.startswith(name + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_600_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


BLOCK_LIGHTNING = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning" or name.startswith("lightning.") or name == "pytorch_lightning":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_search_layer_imports_without_lightning():
    done = run_python(
        BLOCK_LIGHTNING
        + "import lightning_fms.search, lightning_fms.search.optimizer, lightning_fms.frozen.levels\n"
        + "from lightning_fms import FreezeThawOptimizer, SearchSpace, build_searcher\n"
        + "assert not any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_blocker_really_blocks_lightning():
    done = run_python(BLOCK_LIGHTNING + "import lightning_fms.training.seeder\n")
    assert done.returncode != 0 and "blocked: lightning" in done.stderr


def test_import_lightning_fms_loads_no_cli_wandb_rich_or_plotting():
    done = run_python(
        "import sys, lightning_fms\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'jsonargparse', 'wandb', 'rich', 'matplotlib'})\n"
        "print(','.join(heavy))\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_every_public_name_resolves():
    for name in lightning_fms.__all__:
        assert getattr(lightning_fms, name) is not None


#: The layers, bottom first. A module may import from its own folder and from lower layers only.
LAYERS: list[set[str]] = [
    {"errors"},
    {"lazy", "threads", "extras", "atomic"},
    {"surrogate", "weights", "frozen"},
    {"search"},
    {"hub"},
    {"training"},
    {"study", "zoo"},
    {"observer", "progress", "sweep", "options"},
    {"parallel"},  # several epochs in flight: the concurrent-executor contract, the driver, Ray, the simulation
    {"tuner", "agent", "recipe", "cli_trials", "loggers"},
    {"lightning_cli", "bench", "testing"},
    {"transfer"},  # reads benchmark pools and study directories; the search layer and the bench reach it lazily
    {"cli", "__init__"},
]


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    level = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    found = []
    for source, targets in graph.items():
        for target in targets:
            a, b = unit_of(source), unit_of(target)
            if a != b and level[a] <= level[b]:
                found.append(f"{source} (layer {level[a]}) imports {target} (layer {level[b]})")
    return sorted(found)


def test_every_unit_has_a_layer():
    units = {unit_of(name) for name in import_graph()}
    assert units == set().union(*LAYERS), f"not in LAYERS: {units - set().union(*LAYERS)}"


def test_modules_import_only_from_lower_layers():
    violations = layer_violations(import_graph())
    assert not violations, "imports that run up or sideways:\n" + "\n".join(violations)


def test_the_layer_check_sees_an_upward_import():
    assert layer_violations({"lightning_fms.search.optimizer": {"lightning_fms.tuner"}}) == [
        "lightning_fms.search.optimizer (layer 3) imports lightning_fms.tuner (layer 9)"
    ]
