"""The load generator: uvloop worker processes over the shared HTTP/2 core."""
