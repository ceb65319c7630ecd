"""See a decomposition: ``spd-host serve`` (a local ASGI app), the static ``dashboard`` export,
and exports to Neuronpedia and circuit-tracer. Reads only through ``HarvestRepo``, the label
store and the eval result readers (see ``docs/viewer.md``)."""
