"""forge_core reaches MLX only through forge_mlx: importing forge_mlx first loads an optimized BLAS on Linux
(forge_mlx/blas.py), which works only before mlx itself is imported. A forge_core module that imported mlx or mlx_lm
on its own ran everything after it on the MLX wheel's reference BLAS (`forge export --quantize gptq` did: 15-90x
slower matmuls). The one exception asks Metal for its working set, on macOS, where there is no BLAS to load."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "forge_core"
ALLOWED = {("memory/budget.py", "mlx.core")}  # _metal_working_set: Metal only


def _mlx_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        out += [(node.lineno, n) for n in names if n == "mlx" or n.startswith(("mlx.", "mlx_lm"))]
    return out


def _preceded_by_forge_mlx(path: Path, line: int) -> bool:
    """An `import forge_mlx` (or from forge_mlx...) earlier in the same function or module."""
    lines = path.read_text().splitlines()[:line - 1]
    return any(s.strip().startswith(("import forge_mlx", "from forge_mlx")) for s in lines)


def test_forge_core_imports_mlx_only_after_forge_mlx():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in _mlx_imports(path):
            if (rel, name) not in ALLOWED and not _preceded_by_forge_mlx(path, line):
                bad.append(f"forge_core/{rel}:{line} imports {name}")
    assert not bad, bad


def test_the_check_sees_an_import_of_mlx(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mlx_lm import convert\n")
    assert _mlx_imports(f) == [(2, "mlx_lm")] and not _preceded_by_forge_mlx(f, 2)
    f.write_text("def f():\n    import forge_mlx\n    from mlx_lm import convert\n")
    assert _preceded_by_forge_mlx(f, 3)
