"""spd-host plugin for the spd method (entry point: spd)."""
