"""The tree shows the pipeline, and imports run one way down it: no package imports from a package
after it, and no module grows into a grab-bag."""

import ast
from pathlib import Path

SEG = Path(__file__).resolve().parent.parent / "seg"
# Lower rank = earlier in the pipeline. A module may import only from its own package or a lower rank.
RANK = {"runtime": 0, "data": 1, "backbones": 2, "cache": 3, "extraction": 4, "heads": 4, "scoring": 5,
        "train": 6, "infer": 7, "deploy": 7.5, "extract_features": 8, "train_head": 8, "evaluate": 8, "predict": 8, "export_model": 8,
        "demo": 9, "experiments": 9, "adapt": 9, "cli": 10, "__main__": 11, "__init__": 11}
MAX_LINES = 350


def unit(module: str) -> str:
    """'seg.train.epochs' -> 'train'; 'seg.cli' -> 'cli'; 'seg' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def seg_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "seg"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "seg":
            if node.module == "seg":  # `from seg import cache`: a subpackage or module by name
                found |= {f"seg.{a.name}" if a.name in RANK else "seg" for a in node.names}
            else:
                found.add(node.module)
    return found


def modules():
    for path in sorted(SEG.rglob("*.py")):
        rel = path.relative_to(SEG.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_every_module_belongs_to_a_ranked_unit():
    assert {unit(m) for m, _ in modules()} <= set(RANK)


def test_imports_run_one_way_down_the_pipeline():
    upward = []
    for module, path in modules():
        here = unit(module)
        for imported in seg_imports(path):
            there = unit(imported)
            if there != here and there != "__init__" and RANK[there] >= RANK[here]:
                upward.append(f"{module} imports {imported}")
    # `import seg` for __version__ is the one allowed reference to the top (it loads nothing else)
    assert not upward, upward


def test_tree_shape():
    flat = [p for p in SEG.glob("*.py")]
    packages = [p for p in SEG.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert len(flat) <= 12, sorted(p.name for p in flat)
    assert len(packages) >= 5
    long = {str(p.relative_to(SEG)): n for _, p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_class_grows_past_200_lines():
    """A class past ~200 lines holds more than one concept (issue 33: Trainer, then CacheSplit)."""
    big = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                big.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, big
