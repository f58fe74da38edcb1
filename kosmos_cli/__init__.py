"""kosmos: transcribe documents with Kosmos-2.5 and ground captions with Kosmos-2.

    import kosmos_cli
    engine = kosmos_cli.load("microsoft/kosmos-2.5")          # local directory or Hub id
    ids = engine.generate(images, "<ocr>", max_new_tokens=1024)
    text = engine.decode(ids[0])
"""

__version__ = "0.1.0"
__all__ = ["load", "Engine"]


def __getattr__(name: str):
    # Imported lazily so that `kosmos --help` and the CLI's argument errors don't wait for torch.
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'kosmos_cli' has no attribute {name!r}")
