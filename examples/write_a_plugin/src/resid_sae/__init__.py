"""An SAE on the residual stream, packaged as an spd-host method plugin (an example)."""
