"""What ponder is measured and checked against: ``oracle`` (and ``oracle_pf``), per-problem
re-implementations of the search methods written search-and-learn's way (the tests' oracle),
and ``recompute``, a policy and PRM that re-encode every path from scratch (the benchmarks'
baseline)."""
