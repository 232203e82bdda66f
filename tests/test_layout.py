"""The shape rules of ``kdqa/`` that a reader relies on: no import circle among its modules (a
function-local import counts: it hides a circle, it does not break one), and no function over
60 lines, no module over 750 (one job per module: the trainer is one job, as torchtune's 777-line
recipe is, but its optimizer set-up, objective and result files live elsewhere).  They read the
source; nothing is imported."""

import ast
import pathlib

KDQA = pathlib.Path(__file__).resolve().parents[1] / "kdqa"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 750


def _modules():
    return {path.stem: ast.parse(path.read_text(encoding="utf-8"), str(path))
            for path in sorted(KDQA.glob("*.py")) if path.stem != "__init__"}


def _imported_kdqa_modules(tree, known):
    """The kdqa modules that ``tree`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module not in ("kdqa", None) and not node.module.startswith("kdqa."):
                continue
            base = (node.module or "").removeprefix("kdqa").lstrip(".")
            # "from kdqa import x" / "from . import x": x may be a module; "from .m import x": m is.
            names = [f"kdqa.{base}"] if base else [f"kdqa.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "kdqa" and len(parts) > 1 and parts[1] in known:
                found.add(parts[1])
    return found


def import_graph():
    modules = _modules()
    return {name: _imported_kdqa_modules(tree, modules) - {name} for name, tree in modules.items()}


def find_cycle(graph):
    """One import circle as a list of module names (first == last), or None."""
    state = {}  # name -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_names_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_function_local_and_relative_imports():
    tree = ast.parse("from .x import f\ndef g():\n    from kdqa import y\n    import kdqa.z as z\n")
    assert _imported_kdqa_modules(tree, {"x", "y", "z", "w"}) == {"x", "y", "z"}


def test_no_import_circle_among_kdqa_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle in kdqa/: " + " -> ".join(cycle)


def test_no_function_in_kdqa_over_60_lines():
    too_long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines in kdqa/: " + ", ".join(too_long)


def test_no_module_in_kdqa_over_750_lines():
    too_long = {path.name: n for path in sorted(KDQA.glob("*.py"))
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines in kdqa/: {too_long}"
