"""A local STAC endpoint serving the synthetic Earth as COGs, with fault injection.

For tests, benchmarks and offline demos: the STAC source reads it through pystac-client, the
planetary-computer package's signing and rasterio exactly as it reads Planetary Computer or
Earth Search. Start it with ``tessera stac-endpoint`` or, in Python::

    with LocalEndpoint(EndpointConfig(months=(6,))) as ep:
        cfg = ep.stac_config("planetary-computer")  # source.stac settings for this endpoint
"""

from tasks.sources.stac_endpoint._config import EndpointConfig, FaultConfig
from tasks.sources.stac_endpoint._server import LocalEndpoint, Stats
from tasks.sources.stac_endpoint._world import Granule, World

__all__ = ["EndpointConfig", "FaultConfig", "Granule", "LocalEndpoint", "Stats", "World"]
