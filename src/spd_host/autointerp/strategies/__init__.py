"""Prompt strategies: the contract (:mod:`.base`) and the built-in ones."""
