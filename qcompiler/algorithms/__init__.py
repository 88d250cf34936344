"""Pure mathematics over arrays: grids, packing, rounding methods. Imports nothing of the graph layer."""
