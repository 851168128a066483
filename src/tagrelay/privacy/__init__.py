"""Privacy requests and the data map: erasure and access across every store
(``privacy.requests``: ``tagrelay forget``, ``tagrelay export``) and the report of where
personal data is kept, how long, encrypted or not, and which forwarder receives which
fields (``privacy.report``: ``tagrelay privacy report``)."""
