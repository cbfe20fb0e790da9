"""inspectd: edge inspection daemon (GenICam -> anomaly engine -> OK/NG verdicts)."""

__version__ = "0.1.0"
