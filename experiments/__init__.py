"""Drivers for the paper's studies: LR sweep, Post-Squeeze heatmap, protocol table, variance retention."""
