"""Transitional: the names experiments/common.py used to define, now defined by responsibility in

    cells.py    Cell, the cell folder (cell.json, train/, failed.json), claim_run_dir
    grid.py     run_cells / run_grid (resumable, ETA), train_run (the one call of the trainer)
    results.py  read_run_results (the one reader of the trainer's files), collect_rows, select, mean_score
    tables.py   atomic text/JSON/CSV, markdown_table, write_rows (rows.json / rows.csv)
    plots.py    plot_heatmap, plot_lines
    presets.py  study_config (paper / reduced / tiny), training_config, apply_overrides, lr_table
    driver.py   the drivers' shared command line

Import those modules in new code; this one re-exports them only until the drivers still written
against it (protocol_table.py, stats.py) move over, then it goes.
"""

# ruff: noqa: F401
from experiments.cells import (
  CELL_FILE,
  FAILED_FILE,
  RUNS_DIR,
  TRAIN_DIR,
  Cell,
  Row,
  check_unique_names,
  claim_run_dir,
  run_dir,
)
from experiments.driver import define_driver_flags, driver_main
from experiments.grid import format_duration, log_line, run_cells, run_grid, train_run
from experiments.plots import plot_heatmap, plot_lines, save_figure
from experiments.presets import (
  PRESETS,
  apply_overrides,
  check_ranks,
  flatten,
  load_config_file,
  lr_table,
  run_overrides,
  steps_for,
  study_config,
  training_config,
)
from experiments.results import (
  RunResults,
  cell_results,
  collect_items,
  collect_rows,
  collect_squeeze_rows,
  mean_score,
  read_run_results,
  select,
)
from experiments.tables import atomic_write_text, markdown_table, write_csv, write_json, write_rows
