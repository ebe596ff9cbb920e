"""Benchmarks: scenarios, the HAProxy baseline and reports."""
