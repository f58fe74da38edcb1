"""kosmos: transcribe documents with Kosmos-2.5 and ground captions with Kosmos-2."""

__version__ = "0.1.0"
