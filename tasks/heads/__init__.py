"""From embeddings to maps: labels, samples, task heads, label-efficiency evaluation, predicted maps.

Prefect-free stage logic (the flows are in :mod:`flows.heads`):

- :mod:`tasks.heads.labels`: read and validate labels (GeoParquet, GeoPackage, GeoJSON, CSV).
- :mod:`tasks.heads.samples`: sample labelled pixels on a published store's grid; raw d-pixel
  features and random-init embeddings of the same pixels.
- :mod:`tasks.heads.models`: classification / regression heads, leak-free splits, versioned
  head artifacts.
- :mod:`tasks.heads.evaluate`: label-efficiency reports and their PNG figures.
- :mod:`tasks.heads.predict`: predicted maps on the store's grid, tile by tile, resumable.
"""
