"""Imports flow one way: config → model + LoRA → data → plan runner → evaluation → CLIs.

Every import statement of lora_squeeze/ (also the ones inside functions) is read with `ast`; the
test fails on an import cycle between modules, on a module that imports one of a higher layer,
on lora_squeeze importing configs/, experiments/ or benchmarks/, and on configs/ importing
anything of this repository but lora_squeeze. A new module of lora_squeeze gets its place in
LAYERS (a package name covers its submodules unless a submodule is listed itself).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "lora_squeeze"
REPO_PACKAGES = ("lora_squeeze", "configs", "experiments", "benchmarks", "tests", "scripts")

# Lowest first. A module may import modules of its own layer or of a lower one (and never in a
# cycle); names are relative to lora_squeeze.
LAYERS = (
  # What everything may raise and check with.
  ("", "errors", "validation", "atomic", "orbax_paths", "bootstrap", "durations", "allocator"),
  # Leaves: pure math and plans, file formats, run checkpoints, device meshes; task types.
  (
    "protocols",
    "squeeze_base",
    "squeeze_rsvd",
    "squeeze_qr_core",
    "squeeze",
    "param_trees",
    "answer_metrics",
    "multihost",
    "sharding",
    "optim",
    "checkpoint",
    "weights.cache",
    "weights.gguf",
    "data.tasks",
    "data.readers",
    "data.images",
    "data.builders",
  ),
  # Built on the leaves: LoRA pytrees, weights and tokenizer, task definitions, batching, adapters.
  (
    "lora_tree_types",
    "lora_tree",
    "sharded_squeeze",
    "opt_state_projection",
    "adapter_size",
    "weights",
    "data.text_tasks",
    "data.vl_tasks",
    "data.digits",
    "data.field_tasks",
    "data.summary_tasks",
    "data.batching",
    "adapters",
  ),
  # The model and the task registry.
  ("model", "data.registry", "data", "adapters.hf_gemma3", "adapters.import_peft", "adapters.export"),
  # Scoring and the config schema (config → plan).
  ("decoding", "evaluate", "config_lib"),
  # The trainer: one step and the run folder's files, what a run shares, its jobs, the plan
  # runner, config -> run; `train` (its __init__) re-exports them all.
  ("train.step", "train.run_dir", "train.progress"),
  ("train.context",),
  ("train.jobs",),
  ("train.runner",),
  ("train.setup", "train"),
  # Command lines.
  ("train_cli", "adapters.squeeze_cli", "adapters.export_cli", "adapters.import_cli", "cli"),
)


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, root: pathlib.Path) -> set[str]:
  """The repository modules `path` imports anywhere in it (module level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the importing module's package
        package = module_name(path, root).split(".")
        package = package if path.name == "__init__.py" else package[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
      else:
        base = node.module
      for alias in node.names:
        # `from pkg import mod` imports the module pkg.mod when there is one, else a name of pkg.
        candidate = f"{base}.{alias.name}"
        sub = root.joinpath(*candidate.split("."))
        found.add(candidate if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file() else base)
  return {name for name in found if name.split(".")[0] in REPO_PACKAGES}


def import_graph(folder: str) -> dict[str, set[str]]:
  root = REPO
  return {module_name(f, root): imports_of(f, root) for f in sorted((REPO / folder).rglob("*.py"))}


def layer_of(module: str) -> int:
  """The layer of a lora_squeeze module: its longest listed prefix; KeyError when none is listed."""
  name = module.removeprefix(PACKAGE).removeprefix(".")
  best = None
  for i, layer in enumerate(LAYERS):
    for entry in layer:
      if (name == entry or (entry and name.startswith(entry + "."))) and (best is None or len(entry) > len(best[1])):
        best = (i, entry)
  if best is None:
    raise KeyError(f"{module} has no place in tests/test_layering.py LAYERS; add it to the layer it belongs to")
  return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles of `graph` (Tarjan's strongly connected components of more than one module,
  or a module importing itself), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph.get(v, ()):
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def layering_errors(graph: dict[str, set[str]]) -> list[str]:
  """Every cycle, upward import and import of a repository folder above the package."""
  errors = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
  for module, deps in sorted(graph.items()):
    for dep in sorted(deps):
      top = dep.split(".")[0]
      if top != PACKAGE:
        errors.append(f"{module} imports {dep}: lora_squeeze imports no configs/experiments/benchmarks")
      elif layer_of(dep) > layer_of(module):
        errors.append(f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)}): an upward import")
  return errors


def test_the_package_has_no_cycle_and_no_upward_import():
  graph = import_graph(PACKAGE)
  assert len(graph) > 30  # the walk found the package
  assert layering_errors(graph) == []


def test_configs_import_only_the_package():
  for module, deps in import_graph("configs").items():
    assert {d.split(".")[0] for d in deps} <= {PACKAGE}, f"{module} imports {sorted(deps)}"


def test_the_checker_finds_cycles_and_upward_imports():
  # The same checker on small graphs it must reject: it can fail.
  graph = {
    "lora_squeeze.data.tasks": {"lora_squeeze.data.text_tasks"},
    "lora_squeeze.data.text_tasks": {"lora_squeeze.data.tasks"},
    "lora_squeeze.squeeze": {"lora_squeeze.train"},
    "lora_squeeze.model": {"configs.common"},
    "lora_squeeze.train.step": {"lora_squeeze.train.runner"},
  }
  errors = layering_errors(graph)
  assert errors[0] == "import cycle: lora_squeeze.data.tasks <-> lora_squeeze.data.text_tasks"
  assert "lora_squeeze.data.tasks (layer 1) imports lora_squeeze.data.text_tasks (layer 2): an upward import" in errors
  assert "lora_squeeze.squeeze (layer 1) imports lora_squeeze.train (layer 9): an upward import" in errors
  assert any(e.startswith("lora_squeeze.model imports configs.common") for e in errors)
  assert "lora_squeeze.train.step (layer 5) imports lora_squeeze.train.runner (layer 8): an upward import" in errors
  assert cycles({"a": {"a"}}) == [["a"]]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  with pytest.raises(KeyError, match="lora_squeeze.new_module has no place"):
    layer_of("lora_squeeze.new_module")


def test_imports_inside_functions_and_submodules_are_seen():
  deps = imports_of(REPO / PACKAGE / "train" / "setup.py", REPO)
  # train/setup.py imports these only inside functions.
  assert {"lora_squeeze.config_lib", "lora_squeeze.data.registry", "lora_squeeze.evaluate"} <= deps
  assert "lora_squeeze.data.tasks" in imports_of(REPO / PACKAGE / "data" / "text_tasks.py", REPO)
