"""Live policy evidence against a running topology: packet probes (scapy) and app-level checks."""
