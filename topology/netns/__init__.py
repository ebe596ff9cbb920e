"""Network-namespace mode's pure plan (sites, veths, addresses) and the setns call; no subprocess."""
