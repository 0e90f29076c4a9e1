"""Pipeline stages of the TESSERA factory.

Each stage is a plain, typed function that runs without Prefect; the thin ``@task`` wrappers
live in :mod:`tasks.prefect_tasks`. Imports run one way: ``tasks -> tessera_model``.
"""
