"""The checks of the XML document files: ALTO 4.4 against the official schema (read from tests/data,
no network) and hOCR with hocr-spec; the namespaces to read them."""

from __future__ import annotations

from pathlib import Path

from hocr_spec import HocrValidator
from lxml import etree

ALTO_DIR = Path(__file__).parents[1] / "data" / "alto"
ALTO = "{http://www.loc.gov/standards/alto/ns-v4#}"
XHTML = "{http://www.w3.org/1999/xhtml}"


class _LocalSchemas(etree.Resolver):
    """The ALTO schema imports XLink from loc.gov: read the copy in tests/data instead (no network)."""

    def resolve(self, url, pubid, context):
        if url == "http://www.loc.gov/standards/xlink/xlink.xsd":
            return self.resolve_filename(str(ALTO_DIR / "xlink.xsd"), context)
        return None


def load_alto_schema() -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(_LocalSchemas())
    return etree.XMLSchema(etree.parse(str(ALTO_DIR / "alto-4-4.xsd"), parser))


def assert_valid_alto(schema: etree.XMLSchema, text: str) -> None:
    doc = etree.fromstring(text.encode("utf-8"))
    assert schema.validate(doc), schema.error_log


def assert_valid_hocr(path: Path) -> None:
    report = HocrValidator("standard").validate(str(path))
    problems = [str(item) for item in report.items if item.level in ("ERROR", "FATAL", "WARN")]
    assert report.is_valid() and problems == [], problems
