"""Prefect flows that compose the factory's stages."""
