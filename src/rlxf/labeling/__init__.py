"""Live human feedback: a labeling web app on a real database (docs/labeling.md).

``rlxf label serve`` runs :mod:`rlxf.labeling.app` over a database of :mod:`rlxf.labeling.schema`
(SQLite by default, any SQLAlchemy URL); :mod:`~rlxf.labeling.accounts` holds users, tokens,
sessions and queues, :mod:`~rlxf.labeling.items` takes items in, :mod:`~rlxf.labeling.work` hands
them out and stores labels, :mod:`~rlxf.labeling.report` gives counts, Krippendorff's α
(:mod:`~rlxf.labeling.agreement`) and the exports, :mod:`~rlxf.labeling.client` talks to a server
or a database for COOL-RLHF's live rounds. Nothing here imports torch.
"""
