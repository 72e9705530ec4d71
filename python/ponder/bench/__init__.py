"""Benchmarks of ponder (``ponder.bench.control_plane``: the search-forest control plane)."""
