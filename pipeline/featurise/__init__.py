"""The features stages' machinery: bring a features cache and its labelling up to date with data.root.

- ``update``: one run's state (``Update``): what is cached, what is new, then the commit;
- ``passes``: the backbone over the new photos, here or on Ray, committed a part at a time;
- ``merge``: the new cache file written from the old one and the parts, with its provenance;
- ``grouping``: the near-duplicate threshold of these photos, and their groups kept in one split.

``stages/features.py`` is the stage; this package is how it does its work.
"""
