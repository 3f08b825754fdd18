"""FaceMoE Edge: pipeline, tracking, gallery, matching, events, CLI.

`__version__` is the one place the release is written (pyproject.toml, `facemoe --version`,
the web UI and the API read it). 0.3 is the release whose gallery schema is migration 0001's
baseline plus 0002-0005 and whose kept crops are 192 px (`app.gallery.codec`); 0.2 is the one
before it, which the migrations and the codec name when they read its galleries.
"""

__version__ = "0.3.0"
