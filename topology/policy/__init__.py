"""The policy compiler: allow-lists to app checks, nftables rulesets and the reachability matrix. Pure."""
