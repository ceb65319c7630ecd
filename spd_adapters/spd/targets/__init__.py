"""Goodfire's own target models (``spd.pretrain.models``) and the pretrain runs that hold them.

``classes`` says whether a ``pretrained_model_class`` is one of them (string match, no import),
``run_reader`` finds a pretrain run's files (local or wandb), ``configs``/``models`` are the
architectures, ``loading`` builds and loads them with checked weights, ``specs`` teaches the
topology their structure, ``tokenizer`` picks the run's tokenizer. See docs/spd.md
"Target models".
"""
