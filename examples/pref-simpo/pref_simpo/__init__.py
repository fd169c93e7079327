"""pref-simpo: the SimPO objective and a response-length reward, as a third-party pref plugin."""

__version__ = "0.1.0"
