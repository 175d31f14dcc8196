"""Benchmark of the DTMF gateway against its floor (make bench, make bench-quick)."""
