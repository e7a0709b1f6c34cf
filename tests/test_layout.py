"""The package's layers (llama_ner/__init__.py): every import in llama_ner, at the top or inside a function,
goes to its own layer or below; the package imports no root script but config_utils and dataset."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "llama_ner"
RANK = {"base": 0, "weights": 1, "model_loading": 2, "training": 3, "generation": 3, "serving": 4, "tiny_models": 4}
BASE_AT_ROOT = {"config_utils", "dataset"}
ROOT_SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def layer(module: str) -> str:
    """'llama_ner.weights.tensor_io' -> 'weights'; io_utils, tokenizer and the root's config_utils/dataset -> 'base'."""
    parts = module.split(".")
    if parts[0] != "llama_ner":
        return "base"
    name = parts[1] if len(parts) > 1 else ""
    return name if name in RANK else "base"


def imports_of(path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def wrong_imports(package: Path) -> list[str]:
    """Every import of a module under `package` (laid out like llama_ner) that goes to a higher layer, or to a
    root script other than config_utils/dataset."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("llama_ner", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        own = layer(module)
        for target in imports_of(path):
            top = target.split(".")[0]
            if top in ROOT_SCRIPTS and top not in BASE_AT_ROOT:
                wrong.append(f"{module} imports the root script {target}")
            if top not in ("llama_ner", *BASE_AT_ROOT):
                continue
            theirs = layer(target)
            same_rank_other = RANK.get(theirs, 0) == RANK.get(own, 0) and theirs != own and own != "base"
            if RANK.get(theirs, 0) > RANK.get(own, 0) or same_rank_other:
                wrong.append(f"{module} ({own}) imports {target} ({theirs})")
    return wrong


def test_each_module_imports_only_its_layer_or_below():
    wrong = wrong_imports(PACKAGE)
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_an_upward_import(tmp_path):
    """A weights module importing generation (inside a function), a generation module importing training, and
    one importing a root script are each found; an import of the base is not."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "generation").mkdir()
    (tmp_path / "weights" / "bad.py").write_text("def f():\n    from llama_ner.generation.metrics import score\n")
    (tmp_path / "generation" / "bad.py").write_text("import llama_ner.training.model\nimport test\n")
    (tmp_path / "weights" / "good.py").write_text("from llama_ner.io_utils import UserError\nimport dataset\n")
    assert wrong_imports(tmp_path) == [
        "llama_ner.generation.bad (generation) imports llama_ner.training.model (training)",
        "llama_ner.generation.bad imports the root script test",
        "llama_ner.weights.bad (weights) imports llama_ner.generation.metrics (generation)",
    ]
