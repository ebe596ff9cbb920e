"""One module per node kind (store router, EC router, DMZ relay, issuance center, OCSP responder, municipality, store controller)."""
