"""Wiring: starts a topology's nodes in loopback or network-namespace mode (the only topology code that imports gateway nodes)."""
