"""kosmos: transcribe documents with Kosmos-2.5 and ground captions with Kosmos-2.

    import kosmos_cli
    for result in kosmos_cli.transcribe(["scans/"], "md"):    # pages in, page records out
        print(result.source, result.page, result.confidence, result.text)

    engine = kosmos_cli.load("microsoft/kosmos-2.5")          # the model itself: local directory or Hub id
    ids = engine.generate(images, "<ocr>", max_new_tokens=1024)
    text = engine.decode(ids[0])
"""

__version__ = "0.1.0"
__all__ = ["load", "Engine", "transcribe", "Settings", "ModelUnusable"]
_WHERE = {"load": "engine", "Engine": "engine", "transcribe": "runner", "Settings": "runner", "ModelUnusable": "runner"}


def __getattr__(name: str):
    # Imported lazily so that `kosmos --help` and the CLI's argument errors don't wait for torch.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'kosmos_cli' has no attribute {name!r}")
