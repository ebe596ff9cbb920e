"""Gateway: the Trio servers of every hop and their shared HTTP/2 + mutual-TLS plumbing."""
