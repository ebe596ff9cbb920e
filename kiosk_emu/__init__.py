"""Kiosk emulator: the emulated card, the kiosk issuance flow and the load generator."""
