"""HTTP/2 sans-IO core and its Trio driver, request/response helpers and the wire messages."""
