"""The issuance business domain, no sockets: clock, rules and fees, ledger, settlement, SLA, OCSP/CRL checks."""
