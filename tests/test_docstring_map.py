"""Every file a module docstring (or a comment) of forge_core, forge_mlx and forge_cuda names exists: the map a
reader follows is true. Names of other projects' files (trl/..., mlx_lm/...) and placeholders (FILE.py) aside."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = ("trl/", "mlx_lm/", "transformers/", "peft/", "torch/", "llama.cpp/")
NAME = re.compile(r"(?<![\w/.])((?:\w+/)*\w+\.py)\b")


def _exists(name: str, here: Path) -> bool:
    if "/" in name:
        return any((base / name).exists() for base in (ROOT, here, ROOT / "forge_core"))
    return any(p.name == name for p in ROOT.glob("**/*.py") if ".venv" not in p.parts)


def _named(path: Path) -> list[str]:
    src = path.read_text()
    texts = [ast.get_docstring(n) or "" for n in ast.walk(ast.parse(src))
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    texts += [line.split("#", 1)[1] for line in src.splitlines() if "#" in line]
    return [m.group(1) for t in texts for m in NAME.finditer(t)]


def test_every_file_a_docstring_names_exists():
    missing = []
    for path in sorted(ROOT.glob("forge_*/**/*.py")):
        for name in _named(path):
            if name == "FILE.py" or name.startswith(FOREIGN):
                continue
            if not _exists(name, path.parent):
                missing.append(f"{path.relative_to(ROOT)} names {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_a_missing_name(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""The loop lives in forge_mlx/trainer.py and data_rows.py."""\n')
    assert _named(f) == ["forge_mlx/trainer.py", "data_rows.py"]
    assert not _exists("forge_mlx/trainer.py", tmp_path) and _exists("forge_core/train.py", tmp_path)
