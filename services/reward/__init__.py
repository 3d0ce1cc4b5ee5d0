"""Reward model service: a Ray Serve deployment that scores (prompt, response) pairs for online
preference training (``services.reward.app``; wire format in ``services.reward.schemas``)."""
