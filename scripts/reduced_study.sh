#!/usr/bin/env bash
# The `reduced` presets are the CPU study of issue 16 (mmlu_field; docs/reproducing.md) since the
# BoolQ study under docs/results/{heatmap,protocols,retention} (commit 6c91713) showed nothing but
# noise. This runs that study: scripts/cpu_study.sh (same arguments; reports go to docs/results/cpu/).
exec "$(dirname "$0")/cpu_study.sh" "$@"
