"""The architecture the tree promises: the library does not reach into the lmms-eval
wrappers, one module touches transformers internals, and shipped files name no path of
the machine that wrote them."""

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "dyrate_eval"
# what the core relies on beyond transformers' public model classes
TRANSFORMERS_INTERNALS = {"AttentionInterface", "DynamicCache", "create_causal_mask", "BaseModelOutputWithPast"}


def imports(path: Path) -> list[tuple[str, set[str]]]:
    """(module, names) of every import in a file, relative ones resolved to dyrate_eval.*."""
    found = []
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, {alias.name for alias in node.names}))
    return found


def test_the_library_does_not_import_the_lmms_eval_wrappers():
    offenders = [str(path.relative_to(REPO)) for path in LIBRARY.rglob("*.py")
                 if any(module.startswith("model_wrappers") for module, _ in imports(path))]
    assert offenders == [], "reach the lmms-eval models through lmms-eval's registry (harness.lmms_model_class)"


def test_only_the_hf_boundary_touches_transformers_internals():
    touching = set()
    for path in LIBRARY.rglob("*.py"):
        for module, names in imports(path):
            internal_module = module.startswith("transformers.") and module.split(".")[1] in {
                "masking_utils", "modeling_outputs", "cache_utils", "modeling_utils", "integrations"}
            if internal_module or (module == "transformers" and names & TRANSFORMERS_INTERNALS):
                touching.add(str(path.relative_to(REPO)))
    assert touching == {"dyrate_eval/core/hf_llava.py"}


def test_shipped_files_name_no_absolute_path():
    tracked = subprocess.run(["git", "ls-files", "dyrate_eval", "tasks", "results", "docs"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    machine_path = re.compile(r"(^|[^\w.~-])/(work|home|tmp|root|Users|mnt|scratch)/")
    offenders = []
    for name in tracked:
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # weights, images, data
        if machine_path.search(text):
            offenders.append(name)
    assert offenders == []
