"""Deployments of the factory's flows, and the ``tessera`` command line."""
