"""Scripts run by hand; a package so that the bench (``tools.qbench``) imports from the repo root."""
