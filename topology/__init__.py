"""Topology: the file format, its validation, the test PKI, the policy compiler and the launcher."""
