"""A local Sentinel Hub endpoint serving the synthetic Earth, with fault injection.

For tests, benchmarks and offline demos: the real sentinelhub-py client talks to it over
loopback HTTP exactly as it talks to Sentinel Hub or CDSE. Start it with
``tessera shub-endpoint`` or, in Python::

    with LocalEndpoint(EndpointConfig(faults=FaultConfig(rate=0.2))) as ep:
        print(ep.url)  # source.sentinelhub: preset=custom, base_url=ep.url
"""

from tasks.sources.shub_endpoint._config import EndpointConfig, FaultConfig
from tasks.sources.shub_endpoint._server import LocalEndpoint, Stats

__all__ = ["EndpointConfig", "FaultConfig", "LocalEndpoint", "Stats"]
