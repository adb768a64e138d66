"""Reproduce the papers' tables: published cells -> run plans -> runs -> a collected comparison table."""

from .table import Cell, load_cells, table_ids
from .plan import plan_cell, plan_table, PlannedRun

__all__ = ["Cell", "load_cells", "table_ids", "plan_cell", "plan_table", "PlannedRun"]
