"""One node's server: the deny-early listener (address before TLS, identity after, method/path per request)."""
