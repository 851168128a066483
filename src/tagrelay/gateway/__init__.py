"""The Google tag gateway's pure parts: what a request below a gateway route is
(``hits``), what passes to Google and back (``headers``), and where the visitor is
(``geo``). The HTTP shell that forwards the requests and keeps the copies is
``tagrelay.web.gateway``.
"""
