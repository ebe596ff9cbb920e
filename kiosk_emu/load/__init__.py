"""The load generator: many kiosks over uvloop worker processes, open or closed loop, HDR histograms.

`spec` says what to run; `run` spawns the workers (`worker`, each with its `kiosk`s over
`h2asyncio`, counting into `stats`, arrivals from `arrivals`), starts them together and
adds their encoded `histogram`s up (`merge`).
"""
