"""SQL engines behind the warehouse: ``base`` states the contract, ``duckdb`` is the embedded
default. A new engine is one module here and one line in ``tagrelay.warehouse.DIALECTS``."""
