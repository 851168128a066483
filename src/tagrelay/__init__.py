"""tagrelay: a first-party server-side tracking relay.

The path of an event, end to end:

1. ``sources/`` decode an HTTP request (Segment spec, Jitsu, ...) into events of one
   model, or reject it with a 4xx and a counted reason;
2. ``pipeline/`` normalizes each event: ids, timestamps and clock skew, IP, user agent,
   campaign;
3. ``spool/`` commits the events to a durable SQLite queue; only then does the client get
   its 2xx;
4. ``forwarders/`` run one worker per configured destination, each with its own cursor on
   the spool: filter, build the request, send, classify the outcome (delivered, retry,
   dead letter);
5. ``warehouse/`` is a forwarder like the others: it flattens events into an ``events``
   table whose columns evolve with the data.

``app.create_app`` wires these parts together; ``cli`` runs them.
"""

__version__ = "0.1.0"
