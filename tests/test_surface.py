"""compressor's public surface: what serve, the benchmarks and users import."""

import ast
import subprocess
import sys
from pathlib import Path

import compressor

ROOT = Path(__file__).parents[1]


def test_every_name_of_the_surface_resolves():
    for name in compressor.__all__:
        assert getattr(compressor, name) is not None, name


def test_the_names_type_checkers_see_are_the_surface():
    tree = ast.parse((ROOT / "compressor" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen = {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert seen == set(compressor.__all__)


def test_serve_imports_nothing_of_compressor_but_its_surface():
    stray = []
    for path in sorted((ROOT / "serve").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                stray += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] == "compressor"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "compressor":
                if node.module != "compressor":
                    stray.append(f"{path.name}: from {node.module} import ...")
                stray += [f"{path.name}: {a.name} is not in compressor.__all__" for a in node.names if a.name not in compressor.__all__]
    assert stray == []


def test_importing_the_surface_loads_no_torch_until_a_name_needs_it():
    code = "import sys, compressor; compressor.named_path('a=b'); compressor.METHODS; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
