"""Preprocessing stages (DESIGN §6): grids, lung masks, layouts, lesion-scale ROIs, split, cases."""
