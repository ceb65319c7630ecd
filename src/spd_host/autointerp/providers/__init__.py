"""LLM providers: the contract (:mod:`.base`) and the built-in ones.

Provider modules import their SDK lazily (inside ``make_client``), so listing providers is
cheap and the offline baseline works without ``anthropic`` / ``openai`` installed.
"""
