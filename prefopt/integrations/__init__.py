"""Integrations of prefopt's fused op into other libraries' trainers (:mod:`prefopt.integrations.trl`)."""
