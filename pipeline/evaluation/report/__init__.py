"""The library under the ``report`` stage: the README's sections (:mod:`.sections`, one renderer
per section, their prose in ``templates/*.md``), its header (:mod:`.header`), the tables and
figures it embeds (:mod:`.assets`) and the published values put next to ours
(:mod:`.published_lookup`). The gallery (index.html) is built by :mod:`pipeline.viz.gallery`."""
