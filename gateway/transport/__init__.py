"""Mutual TLS contexts and connections to upstream nodes."""
