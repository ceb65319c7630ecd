"""spd-host plugin for the transcoder method (entry point: transcoder)."""
