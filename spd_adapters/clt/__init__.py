"""spd-host plugin for the clt method (entry point: clt)."""
