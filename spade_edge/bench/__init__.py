"""Benchmarks: commands that measure, print tables, and write the numbers they print."""
