"""``producer/`` is the light contract and client: nothing in it imports ``worker/``."""

import ast
from pathlib import Path

PRODUCER = Path(__file__).resolve().parent.parent / "producer"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_no_producer_module_imports_the_worker():
    files = sorted(PRODUCER.rglob("*.py"))
    assert len(files) > 10
    crossing = {
        f"{path.relative_to(PRODUCER.parent)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module == "worker" or module.startswith("worker.")
    }
    assert not crossing, sorted(crossing)


def test_no_producer_module_imports_torch():
    heavy = ("torch", "transformers")
    crossing = {
        f"{path.relative_to(PRODUCER.parent)} imports {module}"
        for path in sorted(PRODUCER.rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in heavy
    }
    assert not crossing, sorted(crossing)
