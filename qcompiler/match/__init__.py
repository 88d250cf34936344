"""Read-only analysis of a graph: which weights are quantizable sites, and why others are not."""

from qcompiler.match.sites import find_linear_sites
from qcompiler.sites import LinearSite, MatchResult, Rejection

__all__ = ["LinearSite", "MatchResult", "Rejection", "find_linear_sites"]
