"""The topology file: its structs, loading and validation. Pure: imports nothing from gateway, kiosk_emu or bench."""
