"""The pipeline: what happens to every event between its source and the spool.

One module per step (``normalize``, ``client``, ``campaign``, ``consent``, ``identity``,
``privacy``; ``host`` parses Host headers for them), and ``run``, where
:class:`~tagrelay.pipeline.run.Pipeline` takes a request's events through the steps in
order: the path of an event reads there, top to bottom.

Nothing is imported here, so that importing one step (``config.models`` uses ``host``)
does not import them all.
"""
